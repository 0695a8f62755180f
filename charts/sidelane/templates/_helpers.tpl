{{- define "sidelane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidelane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "sidelane.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "sidelane.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sidelane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sidelane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sidelane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidelane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sidelane.serviceAccountName" -}}
{{- default (include "sidelane.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "sidelane.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Paths inside the containers. The host's CNI and cgroup dirs are
mounted under /host so they never shadow the container's own. */}}
{{- define "sidelane.runDir" -}}/var/run/sidelane{{- end }}
{{- define "sidelane.socket" -}}/var/run/sidelane/cni.sock{{- end }}

{{/* The dir of the agent's xDS socket for the node proxy: its own host dir,
never the run dir (values.schema.json refuses that too). */}}
{{- define "sidelane.xdsDir" -}}
{{- $dir := dir .Values.nodeProxy.xdsSocket }}
{{- if or (eq $dir (include "sidelane.runDir" .)) (hasPrefix (printf "%s/" (include "sidelane.runDir" .)) $dir) }}
{{- fail (printf "nodeProxy.xdsSocket %s: must not be in the agent's run dir %s (the node proxy mounts the socket's dir)" .Values.nodeProxy.xdsSocket (include "sidelane.runDir" .)) }}
{{- end }}
{{- $dir }}
{{- end }}
