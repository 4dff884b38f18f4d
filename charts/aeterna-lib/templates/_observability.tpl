{{/*
Alerts and dashboards of a chart, from its files: files/prometheus-rules.yaml (written by
scripts/gen_alerts.py) as a PrometheusRule, and each files/dashboards/*.json (written by
scripts/gen_dashboards.py) as a ConfigMap that Grafana's dashboard sidecar loads.
*/}}

{{- define "aeterna-lib.prometheusRule" -}}
{{- if .Values.prometheusRule.enabled -}}
{{- $rules := .Files.Get "files/prometheus-rules.yaml" -}}
{{- if not $rules -}}
{{- fail "files/prometheus-rules.yaml is missing from the chart (make gen)" -}}
{{- end -}}
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ include "aeterna-lib.fullname" . }}
  labels:
    {{- include "aeterna-lib.labels" . | nindent 4 }}
    {{- with .Values.prometheusRule.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- $rules | fromYaml | toYaml | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "aeterna-lib.dashboards" -}}
{{- if .Values.dashboards.enabled -}}
{{- range $path, $_ := .Files.Glob "files/dashboards/*.json" }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "aeterna-lib.fullname" $ }}-dashboard-{{ base $path | trimSuffix ".json" }}
  labels:
    {{- include "aeterna-lib.labels" $ | nindent 4 }}
    {{ $.Values.dashboards.label }}: {{ $.Values.dashboards.labelValue | quote }}
  {{- with $.Values.dashboards.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
data:
  {{ base $path }}: |-
    {{- $.Files.Get $path | nindent 4 }}
{{- end }}
{{- end -}}
{{- end -}}
