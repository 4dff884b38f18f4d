{{/*
Schema migrations: a pre-install,pre-upgrade hook Job that runs "<image> migrate" as the
schema owner, before any pod of the new release starts. Serving pods never migrate
(AETERNA_MIGRATE_ON_START=false); they wait for the schema version they need.

Hooks run before the release's ordinary resources exist, so the Job uses none of them: its
environment is inline, it runs under the namespace's default ServiceAccount without a token,
and it brings its own NetworkPolicy (a hook too, created first by weight).
*/}}

{{- define "aeterna-lib.migrationLabels" -}}
app.kubernetes.io/name: {{ include "aeterna-lib.name" . }}-migrate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aeterna
app.kubernetes.io/component: migrate
{{- end -}}

{{- define "aeterna-lib.migrationJob" -}}
{{- if .Values.migrations.enabled -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "aeterna-lib.fullname" . }}-migrate
  labels:
    {{- include "aeterna-lib.migrationLabels" . | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "0"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  backoffLimit: {{ .Values.migrations.backoffLimit }}
  activeDeadlineSeconds: {{ .Values.migrations.activeDeadlineSeconds }}
  template:
    metadata:
      labels:
        {{- include "aeterna-lib.migrationLabels" . | nindent 8 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- include "aeterna-lib.podSecurityContext" . | nindent 8 }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: migrate
          image: {{ include "aeterna-lib.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args: ["migrate"]
          env:
            - name: AETERNA_DATABASE_OWNER_URL
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.database.existingSecret }}
                  key: {{ .Values.database.ownerUrlKey }}
            # Only read for the application role's name, which the migrations grant access to.
            - name: AETERNA_DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.database.existingSecret }}
                  key: {{ .Values.database.urlKey }}
            # Only read for the indexer role's name, which the migrations grant SELECT to.
            - name: AETERNA_DATABASE_INDEXER_URL
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.database.existingSecret }}
                  key: {{ .Values.database.indexerUrlKey }}
            - name: AETERNA_LOG_JSON
              value: "true"
          resources:
            {{- toYaml .Values.migrations.resources | nindent 12 }}
          securityContext:
            {{- include "aeterna-lib.containerSecurityContext" (dict "user" .Values.securityContext.runAsUser "group" .Values.securityContext.runAsGroup) | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
{{- end -}}
{{- end -}}

{{/* Egress of the migration Job (DNS and PostgreSQL), in place before the Job starts. */}}
{{- define "aeterna-lib.migrationNetworkPolicy" -}}
{{- if and .Values.migrations.enabled .Values.networkPolicy.enabled -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "aeterna-lib.fullname" . }}-migrate
  labels:
    {{- include "aeterna-lib.migrationLabels" . | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "aeterna-lib.name" . }}-migrate
      app.kubernetes.io/instance: {{ .Release.Name }}
  policyTypes: ["Ingress", "Egress"]
  ingress: []
  egress:
    {{- include "aeterna-lib.egressRules" . | nindent 4 }}
{{- end -}}
{{- end -}}
