{{/*
Names and labels (trimmed from `helm create`).
*/}}
{{- define "moe-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-fleet.labels" -}}
helm.sh/chart: {{ include "moe-fleet.chart" . }}
{{ include "moe-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moe-fleet
{{- end }}

{{/*
The operator pods' name label is fixed: runtime NetworkPolicies admit pods labelled
app.kubernetes.io/name=moe-operator (any namespace) to the runtime's admin port.
*/}}
{{- define "moe-fleet.selectorLabels" -}}
app.kubernetes.io/name: moe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Rules for the namespaced resources the operator manages: only those (no secrets, no wildcards).
*/}}
{{- define "moe-fleet.namespacedRules" -}}
- apiGroups: ["serving.moefleet.dev"]
  resources: ["moedeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.moefleet.dev"]
  resources: ["moedeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: ["serving.moefleet.dev"]
  resources: ["moedeployments/scale"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: watch ranks, label leaders (rank label), delete a group's pods to restart it as a whole.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.peering }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
