{{/*
The edge: Envoy alone, routing each aeterna.<domain>.v1 package to its service's headless
Service. Bootstrap: files/envoy.json, or files/envoy-tls.json when tls.enabled.
*/}}

{{- define "aeterna-lib.gatewayMetricsPort" -}}9902{{- end -}}

{{- define "aeterna-lib.gatewayPodMonitor" -}}
{{- if .Values.podMonitor.enabled -}}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
    {{- with .Values.podMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "aeterna-lib.selectorLabels" . | nindent 6 }}
  podMetricsEndpoints:
    - port: metrics
      path: /stats/prometheus
      interval: {{ .Values.podMonitor.interval }}
      relabelings:
        # job="aeterna-gateway", as the PrometheusRule and the dashboards select it.
        - targetLabel: job
          replacement: {{ include "aeterna-lib.fullname" . }}
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.gatewayFile" -}}
{{- if .Values.tls.enabled -}}files/envoy-tls.json{{- else -}}files/envoy.json{{- end -}}
{{- end -}}

{{- define "aeterna-lib.gatewayDeployment" -}}
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
        checksum/envoy: {{ include "aeterna-lib.envoyBootstrap" (dict "ctx" . "file" (include "aeterna-lib.gatewayFile" .)) | sha256sum }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      securityContext:
        {{- include "aeterna-lib.podSecurityContext" . | nindent 8 }}
      {{- include "aeterna-lib.scheduling" . | nindent 6 }}
      containers:
        {{- $probes := dict
              "readinessProbe" (dict "tcpSocket" (dict "port" "grpc") "periodSeconds" 5 "failureThreshold" 2)
              "livenessProbe" (dict "tcpSocket" (dict "port" "grpc") "periodSeconds" 10 "failureThreshold" 3) }}
        {{- /* Keep accepting while the endpoint is removed from the Service, then stop. */}}
        {{- $lifecycle := dict "preStop" (dict "sleep" (dict "seconds" .Values.preStopSleepSeconds)) }}
        {{- include "aeterna-lib.envoyContainer" (dict "ctx" . "envoy" .Values.envoy "name" "envoy" "tls" .Values.tls.enabled "probes" $probes "lifecycle" $lifecycle "metricsPort" (include "aeterna-lib.gatewayMetricsPort" .)) | nindent 8 }}
      volumes:
        {{- include "aeterna-lib.jwksVolume" . | nindent 8 }}
        {{- if .Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
            items:
              - key: tls.crt
                path: tls.crt
              - key: tls.key
                path: tls.key
        {{- end }}
        {{- include "aeterna-lib.envoyVolumes" . | nindent 8 }}
{{- end -}}

{{- define "aeterna-lib.gatewayService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
  {{- with .Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .Values.service.type }}
  selector:
    {{- include "aeterna-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .Values.service.port }}
      targetPort: grpc
      protocol: TCP
      {{- if not .Values.tls.enabled }}
      appProtocol: kubernetes.io/h2c
      {{- end }}
{{- end -}}

{{/* The edge admits the configured clients (everyone by default) on its listener. */}}
{{- define "aeterna-lib.gatewayNetworkPolicy" -}}
{{- if .Values.networkPolicy.enabled -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "aeterna-lib.selectorLabels" . | nindent 6 }}
  policyTypes: ["Ingress", "Egress"]
  ingress:
    - ports:
        - port: {{ include "aeterna-lib.grpcPort" . }}
          protocol: TCP
      {{- with .Values.networkPolicy.clients }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    # Prometheus, on Envoy's metrics port only.
    - ports:
        - port: {{ include "aeterna-lib.gatewayMetricsPort" . }}
          protocol: TCP
      from:
        - namespaceSelector:
            {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 12 }}
          podSelector:
            {{- toYaml .Values.networkPolicy.prometheus.podSelector | nindent 12 }}
  egress:
    {{- include "aeterna-lib.egressRules" . | nindent 4 }}
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.gatewayConfigMap" -}}
{{- include "aeterna-lib.envoyConfigMap" (dict "ctx" . "file" (include "aeterna-lib.gatewayFile" .)) -}}
{{- end -}}
