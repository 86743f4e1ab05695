{{/*
Base name of every object: the release name (or fullnameOverride), cut to leave
room for the "-operator" / "-gateway" suffixes within 63 characters.
*/}}
{{- define "modelfleet.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Cluster-scoped objects (ClusterRoles, bindings) carry the namespace too: releases in two namespaces never clash. */}}
{{- define "modelfleet.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "modelfleet.fullname" .) -}}
{{- end -}}

{{- define "modelfleet.selectorLabels" -}}
app.kubernetes.io/name: modelfleet
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelfleet.labels" -}}
{{ include "modelfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The image of operator, gateway and sidecar; the engines use the same registry and tag. */}}
{{- define "modelfleet.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "modelfleet.image" -}}
{{- printf "%s/modelfleet:%s" .Values.image.registry (include "modelfleet.tag" .) -}}
{{- end -}}

{{- define "modelfleet.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "modelfleet.fullname" .)) .Values.serviceAccount.operatorName -}}
{{- end -}}

{{- define "modelfleet.gatewayServiceAccount" -}}
{{- default (printf "%s-gateway" (include "modelfleet.fullname" .)) .Values.serviceAccount.gatewayName -}}
{{- end -}}
