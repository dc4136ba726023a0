{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "headcni.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name plus chart name, unless the release name already
contains the chart name. Truncated to 53 characters so that the suffixed names
below ("-teardown", "-metrics", ...) stay within a DNS label.
*/}}
{{- define "headcni.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "headcni.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels common to every resource.
*/}}
{{- define "headcni.labels" -}}
helm.sh/chart: {{ include "headcni.chart" . }}
{{ include "headcni.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: headcni
{{- end }}

{{/*
Selector labels: immutable once a DaemonSet exists, keep them minimal.
*/}}
{{- define "headcni.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headcni.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "headcni.agentSelectorLabels" -}}
{{ include "headcni.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "headcni.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "headcni.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "headcni.teardownName" -}}
{{- printf "%s-teardown" (include "headcni.fullname" .) }}
{{- end }}

{{- define "headcni.metricsServiceName" -}}
{{- printf "%s-metrics" (include "headcni.fullname" .) }}
{{- end }}

{{/*
Image reference from {repository, tag, digest}; $.Chart.AppVersion is the default tag.
Usage: include "headcni.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion)
*/}}
{{- define "headcni.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .default .image.tag | toString) }}
{{- end }}
{{- end }}

{{- define "headcni.image" -}}
{{- include "headcni.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{/*
The Secret holding the keys, and which keys are present.
*/}}
{{- define "headcni.secretName" -}}
{{- if .Values.config.headscale.existingSecret }}
{{- .Values.config.headscale.existingSecret }}
{{- else }}
{{- printf "%s-keys" (include "headcni.fullname" .) }}
{{- end }}
{{- end }}

{{- define "headcni.hasAuthKey" -}}
{{- $h := .Values.config.headscale }}
{{- if $h.existingSecret }}{{ if $h.existingSecretKeys.authKey }}true{{ end }}
{{- else if $h.authKey }}true{{ end }}
{{- end }}

{{- define "headcni.hasApiKey" -}}
{{- $h := .Values.config.headscale }}
{{- if $h.existingSecret }}{{ if $h.existingSecretKeys.apiKey }}true{{ end }}
{{- else if $h.apiKey }}true{{ end }}
{{- end }}

{{/*
How routes are approved: "controller" (headcni controller holds the API key and
approves what each Node's published identity binds) or "autoApprovers" (the
Headscale policy approves; no API key anywhere). "auto": the controller when an
API key is given.
*/}}
{{- define "headcni.approvalMode" -}}
{{- $m := .Values.config.approval.mode }}
{{- if eq $m "auto" }}
{{- if include "headcni.hasApiKey" . }}controller{{ else }}autoApprovers{{ end }}
{{- else }}
{{- $m }}
{{- end }}
{{- end }}

{{- define "headcni.controllerName" -}}
{{- printf "%s-controller" (include "headcni.fullname" .) }}
{{- end }}

{{- define "headcni.approvalsName" -}}
{{- printf "%s-approvals" (include "headcni.fullname" .) }}
{{- end }}

{{- define "headcni.controllerSelectorLabels" -}}
{{ include "headcni.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
LocalAPI socket path for the selected tailscaled mode.
*/}}
{{- define "headcni.tailscaleSocket" -}}
{{- $t := .Values.config.tailscale }}
{{- if $t.socket }}
{{- $t.socket }}
{{- else if eq $t.mode "sidecar" }}
{{- printf "%s/tailscale/tailscaled.sock" (.Values.cni.runDir | trimSuffix "/") }}
{{- else }}
{{- "/var/run/tailscale/tailscaled.sock" }}
{{- end }}
{{- end }}

{{/*
A CIDR value given as a list, a single string or a comma-separated string,
returned as a JSON list (use with fromJsonArray).
*/}}
{{- define "headcni.cidrList" -}}
{{- $out := list }}
{{- if kindIs "string" . }}
{{- range (splitList "," .) }}
{{- if trim . }}{{ $out = append $out (trim .) }}{{ end }}
{{- end }}
{{- else if . }}
{{- range . }}{{ $out = append $out (trim (toString .)) }}{{ end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Address the kubelet probes: the bind address unless it is a wildcard.
*/}}
{{- define "headcni.probeHost" -}}
{{- $b := .Values.metrics.bind | toString }}
{{- if not (has $b (list "0.0.0.0" "::" "[::]" "")) }}
{{- $b | trimPrefix "[" | trimSuffix "]" }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot express. Included by the DaemonSet.
*/}}
{{- define "headcni.validate" -}}
{{- $h := .Values.config.headscale }}
{{- if and $h.existingSecret (or $h.authKey $h.apiKey) }}
{{- fail "config.headscale.existingSecret is set: leave config.headscale.authKey and config.headscale.apiKey empty (the keys come from the existing Secret)" }}
{{- end }}
{{- if and (or (include "headcni.hasAuthKey" .) (include "headcni.hasApiKey" .)) (not $h.url) }}
{{- fail "config.headscale.url is required when an auth key or API key is given" }}
{{- end }}
{{- if and (include "headcni.hasApiKey" .) (hasPrefix "http://" $h.url) }}
{{- fail "config.headscale.url is plain http: the controller sends the API key to Headscale over https only (give config.headscale.caCert for a private certificate)" }}
{{- end }}
{{- $hn := .Values.config.tailscale.hostname }}
{{- if and $hn (not (contains "$(NODE_NAME)" $hn)) }}
{{- fail "config.tailscale.hostname must contain $(NODE_NAME) (e.g. \"prod-$(NODE_NAME)\"): one value is shared by every node of the DaemonSet" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled" }}
{{- end }}
{{- $mode := include "headcni.approvalMode" . }}
{{- if eq $mode "controller" }}
{{- if not (include "headcni.hasApiKey" .) }}
{{- fail "config.approval.mode=controller needs the Headscale API key (config.headscale.apiKey, or existingSecretKeys.apiKey)" }}
{{- end }}
{{- if not (hasPrefix "https://" (lower $h.url)) }}
{{- fail "the controller sends the Headscale API key over https only: config.headscale.url must be https://... (a private CA goes into config.headscale.caCert)" }}
{{- end }}
{{- else if include "headcni.hasApiKey" . }}
{{- fail "an API key is given, but config.approval.mode is autoApprovers: only the controller uses the API key (leave it out, or use mode auto or controller)" }}
{{- end }}
{{- if and (eq .Values.config.tailscale.mode "sidecar") (has (dir (include "headcni.tailscaleSocket" .)) (list "/var/run/tailscale" "/run/tailscale")) }}
{{- fail "sidecar mode must not put its socket in the host tailscaled's directory (/var/run/tailscale): leave config.tailscale.socket empty or choose another directory" }}
{{- end }}
{{- end }}
