{{/*
NetworkPolicies. The namespace denies everything by default (k8s/default-deny.yaml); each
release admits what it needs.
*/}}

{{/* Egress every Aeterna pod needs: DNS, and the other Aeterna pods' gRPC port. */}}
{{- define "aeterna-lib.egressRules" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
- to:
    - podSelector:
        matchLabels:
          app.kubernetes.io/part-of: aeterna
  ports:
    - port: {{ include "aeterna-lib.grpcPort" . }}
      protocol: TCP
{{- with .Values.networkPolicy.egress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
A service's pods: the gateway and the other Aeterna services (app.kubernetes.io/part-of: aeterna)
on the gRPC port, Prometheus on the metrics port.
*/}}
{{- define "aeterna-lib.networkPolicy" -}}
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
    - from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/part-of: aeterna
      ports:
        - port: {{ include "aeterna-lib.grpcPort" . }}
          protocol: TCP
    - from:
        - namespaceSelector:
            {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 12 }}
          podSelector:
            {{- toYaml .Values.networkPolicy.prometheus.podSelector | nindent 12 }}
      ports:
        - port: {{ include "aeterna-lib.metricsPort" . }}
          protocol: TCP
  egress:
    {{- include "aeterna-lib.egressRules" . | nindent 4 }}
{{- end -}}
{{- end -}}
