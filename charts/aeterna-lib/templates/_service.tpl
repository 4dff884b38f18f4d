{{/*
A service chart (memory today; governance, knowledge and sync next): each templates/*.yaml of
charts/memory is one include of a template below with the chart's root context.
*/}}

{{- define "aeterna-lib.sidecarFile" -}}files/envoy-sidecar.json{{- end -}}

{{/* Non-secret settings, as the service reads them (AETERNA_* environment variables). */}}
{{- define "aeterna-lib.settings" -}}
{{- $settings := dict -}}
{{- range $key, $value := .Values.settings -}}
{{- $_ := set $settings $key (toString $value) -}}
{{- end -}}
{{- if .Values.dataVolume.enabled -}}
{{- $_ := set $settings .Values.dataVolume.setting .Values.dataVolume.mountPath -}}
{{- end -}}
{{- /* A chart without tracing values exports no traces. */ -}}
{{- with .Values.tracing -}}
{{- if .enabled -}}
{{- $_ := set $settings "AETERNA_OTEL_EXPORTER" "otlp" -}}
{{- $_ := set $settings "AETERNA_OTEL_ENDPOINT" (required "tracing.otlpEndpoint is required when tracing.enabled" .otlpEndpoint) -}}
{{- end -}}
{{- end -}}
{{- /* Usage, budgets and anomaly detection: only the charts that have these values. */ -}}
{{- with .Values.anomaly -}}
{{- $_ := set $settings "AETERNA_ANOMALY_INTERVAL_S" (toString .intervalSeconds) -}}
{{- end -}}
{{- with .Values.usage -}}
{{- if hasKey . "reportIntervalSeconds" -}}
{{- $_ := set $settings "AETERNA_USAGE_REPORT_INTERVAL_S" (toString .reportIntervalSeconds) -}}
{{- end -}}
{{- if hasKey . "capCheckSeconds" -}}
{{- $_ := set $settings "AETERNA_USAGE_CAP_CHECK_S" (toString .capCheckSeconds) -}}
{{- end -}}
{{- if hasKey . "prices" -}}
{{- $_ := set $settings "AETERNA_GOVERNANCE_USAGE_PRICES" (toJson .prices) -}}
{{- $_ := set $settings "AETERNA_GOVERNANCE_USAGE_CURRENCY" .currency -}}
{{- $_ := set $settings "AETERNA_GOVERNANCE_USAGE_BUDGETS" (toJson .budgets) -}}
{{- $_ := set $settings "AETERNA_GOVERNANCE_USAGE_DEFAULT_BUDGET" (toString .defaultBudget) -}}
{{- $_ := set $settings "AETERNA_GOVERNANCE_USAGE_HARD_CAP" (toString .hardCap) -}}
{{- end -}}
{{- end -}}
{{- /* Set last: ports and paths the templates and the Envoy configuration depend on. */ -}}
{{- $_ := set $settings "AETERNA_LISTEN" (include "aeterna-lib.listen" .) -}}
{{- $_ := set $settings "AETERNA_METRICS_PORT" (include "aeterna-lib.metricsPort" .) -}}
{{- /* Prometheus scrapes the pod IP; the NetworkPolicy limits who reaches the port. */ -}}
{{- $_ := set $settings "AETERNA_METRICS_HOST" "0.0.0.0" -}}
{{- $_ := set $settings "AETERNA_AUTH_JWKS_FILE" (printf "%s/jwks.json" (include "aeterna-lib.jwksDir" .)) -}}
{{- $_ := set $settings "AETERNA_AUTH_ISSUER" .Values.auth.issuer -}}
{{- $_ := set $settings "AETERNA_AUTH_AUDIENCE" .Values.auth.audience -}}
{{- $_ := set $settings "AETERNA_SERVICE_TOKEN_FILE" (printf "%s/token" (include "aeterna-lib.tokenDir" .)) -}}
{{- /* Pods never migrate: the pre-install/pre-upgrade hook Job does, as the owner role. */ -}}
{{- $_ := set $settings "AETERNA_MIGRATE_ON_START" "false" -}}
{{- toYaml $settings -}}
{{- end -}}

{{- define "aeterna-lib.settingsConfigMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "aeterna-lib.fullname" . }}-settings
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
data:
  {{- include "aeterna-lib.settings" . | nindent 2 }}
{{- end -}}

{{/* Environment variables read from Secrets: the DSNs and any extraSecretEnv. */}}
{{- define "aeterna-lib.secretEnv" -}}
- name: AETERNA_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
- name: AETERNA_DATABASE_INDEXER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.indexerUrlKey }}
{{- if .Values.redis.existingSecret }}
- name: AETERNA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- end }}
{{- range .Values.extraSecretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{- define "aeterna-lib.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
spec:
  {{- if not .Values.autoscaling.enabled }}
  replicas: {{ .Values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "aeterna-lib.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "aeterna-lib.labels" . | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Roll the pods when their settings or their Envoy configuration change.
        checksum/settings: {{ include "aeterna-lib.settings" . | sha256sum }}
        checksum/envoy: {{ include "aeterna-lib.envoyBootstrap" (dict "ctx" . "file" (include "aeterna-lib.sidecarFile" .)) | sha256sum }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "aeterna-lib.serviceAccountName" . }}
      # The service talks to no Kubernetes API; its own identity is the projected token below.
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      securityContext:
        {{- include "aeterna-lib.podSecurityContext" . | nindent 8 }}
      {{- include "aeterna-lib.scheduling" . | nindent 6 }}
      initContainers:
        {{- include "aeterna-lib.envoyContainer" (dict "ctx" . "envoy" .Values.sidecar "name" "envoy" "tls" false "restartPolicy" "Always") | nindent 8 }}
      containers:
        - name: {{ include "aeterna-lib.name" . }}
          image: {{ include "aeterna-lib.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          {{- with .Values.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "aeterna-lib.fullname" . }}-settings
          env:
            {{- include "aeterna-lib.secretEnv" . | nindent 12 }}
          ports:
            - name: metrics
              containerPort: {{ include "aeterna-lib.metricsPort" . }}
              protocol: TCP
          # Probes reach the service through the sidecar on the pod's gRPC port (the service
          # itself listens on loopback only). Readiness asks for the service by name: it answers
          # NOT_SERVING until its index has caught up. Liveness asks for the server as a whole,
          # so a long catch-up is not mistaken for a hung process.
          startupProbe:
            grpc:
              port: {{ include "aeterna-lib.grpcPort" . }}
            periodSeconds: 5
            failureThreshold: {{ .Values.probes.startupFailureThreshold }}
          readinessProbe:
            grpc:
              port: {{ include "aeterna-lib.grpcPort" . }}
              service: {{ .Values.grpcService }}
            periodSeconds: {{ .Values.probes.readinessPeriodSeconds }}
            timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: {{ include "aeterna-lib.grpcPort" . }}
            periodSeconds: 10
            timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
            failureThreshold: 3
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            {{- include "aeterna-lib.containerSecurityContext" (dict "user" .Values.securityContext.runAsUser "group" .Values.securityContext.runAsGroup) | nindent 12 }}
          volumeMounts:
            {{- if .Values.dataVolume.enabled }}
            - name: data
              mountPath: {{ .Values.dataVolume.mountPath }}
            {{- end }}
            - name: tmp
              mountPath: /tmp
            - name: jwks
              mountPath: {{ include "aeterna-lib.jwksDir" . }}
              readOnly: true
            - name: service-token
              mountPath: {{ include "aeterna-lib.tokenDir" . }}
              readOnly: true
      volumes:
        {{- if .Values.dataVolume.enabled }}
        # Derived from PostgreSQL and rebuilt at start: no PersistentVolume needed.
        - name: data
          emptyDir:
            sizeLimit: {{ .Values.dataVolume.sizeLimit }}
        {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- include "aeterna-lib.jwksVolume" . | nindent 8 }}
        # The service principal's token for background work (index maintenance, sync cycles).
        - name: service-token
          projected:
            sources:
              - serviceAccountToken:
                  audience: {{ .Values.auth.audience }}
                  expirationSeconds: {{ .Values.auth.serviceTokenExpirationSeconds }}
                  path: token
        {{- include "aeterna-lib.envoyVolumes" . | nindent 8 }}
{{- end -}}

{{/* ClusterIP Service: one stable address for clients that do not balance per request. */}}
{{- define "aeterna-lib.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "aeterna-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ include "aeterna-lib.grpcPort" . }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
{{- end -}}

{{/*
Headless Service: Envoy resolves it to every ready pod and balances per request (L7). The
ServiceMonitor scrapes through it (the only Service with the metrics port).
*/}}
{{- define "aeterna-lib.headlessService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "aeterna-lib.fullname" . }}-headless
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
    aeterna/headless: "true"
spec:
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "aeterna-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ include "aeterna-lib.grpcPort" . }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
    - name: metrics
      port: {{ include "aeterna-lib.metricsPort" . }}
      targetPort: metrics
      protocol: TCP
{{- end -}}

{{- define "aeterna-lib.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "aeterna-lib.serviceAccountName" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
  {{- with .Values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.serviceMonitor" -}}
{{- if .Values.serviceMonitor.enabled -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
    {{- with .Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "aeterna-lib.selectorLabels" . | nindent 6 }}
      aeterna/headless: "true"
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ .Values.serviceMonitor.interval }}
      scrapeTimeout: {{ .Values.serviceMonitor.scrapeTimeout }}
      relabelings:
        # job="aeterna-<service>", as the PrometheusRule and the dashboards select it.
        - targetLabel: job
          replacement: {{ include "aeterna-lib.fullname" . }}
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.sidecarConfigMap" -}}
{{- include "aeterna-lib.envoyConfigMap" (dict "ctx" . "file" (include "aeterna-lib.sidecarFile" .)) -}}
{{- end -}}
