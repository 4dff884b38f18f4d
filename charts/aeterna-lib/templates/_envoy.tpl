{{/*
Envoy: the sidecar of every service pod and the gateway's only container, from one template.
The bootstrap is a chart file with Helm expressions inside its JSON strings, rendered with tpl.
*/}}

{{/*
ConfigMap holding the rendered bootstrap. Call with (dict "ctx" $ "file" "files/envoy.json").
*/}}
{{- define "aeterna-lib.envoyConfigMap" -}}
{{- $ctx := .ctx -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "aeterna-lib.fullname" $ctx }}-envoy
  labels:
    {{- include "aeterna-lib.labels" $ctx | nindent 4 }}
data:
  envoy.json: |
    {{- include "aeterna-lib.envoyBootstrap" . | nindent 4 }}
{{- end -}}

{{/* The rendered bootstrap alone (also hashed into the pod annotations). */}}
{{- define "aeterna-lib.envoyBootstrap" -}}
{{- $text := .ctx.Files.Get .file -}}
{{- if not $text -}}
{{- fail (printf "%s is missing from the chart" .file) -}}
{{- end -}}
{{- tpl $text .ctx -}}
{{- end -}}

{{/*
The Envoy container. Call with (dict "ctx" $ "envoy" <values: image, resources, securityContext,
logLevel> "name" "envoy" "tls" <bool> "restartPolicy" <"Always" for a native sidecar or "">
"metricsPort" <port of Envoy's /stats/prometheus listener, or omitted>).
*/}}
{{- define "aeterna-lib.envoyContainer" -}}
{{- $envoy := .envoy -}}
- name: {{ .name }}
  image: {{ include "aeterna-lib.envoyImage" $envoy.image }}
  imagePullPolicy: {{ $envoy.image.pullPolicy }}
  {{- with .restartPolicy }}
  # A native sidecar: started before the service, stopped after it, so the service's in-flight
  # calls and its outbound calls keep a proxy while it drains.
  restartPolicy: {{ . }}
  {{- end }}
  command: ["envoy"]
  args:
    - --config-path
    - {{ include "aeterna-lib.envoyConfigDir" . }}/envoy.json
    # No shared memory for hot restart: the root filesystem is read-only, Kubernetes restarts.
    - --disable-hot-restart
    - --log-level
    - {{ $envoy.logLevel | default "info" }}
  ports:
    - name: grpc
      containerPort: {{ include "aeterna-lib.grpcPort" . }}
      protocol: TCP
    {{- with .metricsPort }}
    - name: metrics
      containerPort: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .probes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .lifecycle }}
  lifecycle:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml $envoy.resources | nindent 4 }}
  securityContext:
    {{- include "aeterna-lib.containerSecurityContext" (dict "user" $envoy.securityContext.runAsUser "group" $envoy.securityContext.runAsGroup) | nindent 4 }}
  volumeMounts:
    - name: envoy-config
      mountPath: {{ include "aeterna-lib.envoyConfigDir" . }}
      readOnly: true
    - name: jwks
      mountPath: {{ include "aeterna-lib.jwksDir" . }}
      readOnly: true
    {{- if .tls }}
    - name: tls
      mountPath: {{ include "aeterna-lib.tlsDir" . }}
      readOnly: true
    {{- end }}
    - name: envoy-tmp
      mountPath: /tmp
{{- end -}}

{{/* Volumes the Envoy container mounts (the JWKS volume is listed separately: shared). */}}
{{- define "aeterna-lib.envoyVolumes" -}}
- name: envoy-config
  configMap:
    name: {{ include "aeterna-lib.fullname" . }}-envoy
- name: envoy-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}
