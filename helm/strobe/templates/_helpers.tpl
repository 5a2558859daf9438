{{/* Names and labels. */}}
{{- define "strobe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strobe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "strobe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strobe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strobe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "strobe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "strobe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "strobe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "strobe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding the admin HTTP bearer token (given, or made by the chart). */}}
{{- define "strobe.httpTokenSecret" -}}
{{- default (printf "%s-http-token" (include "strobe.fullname" .)) .Values.http.token.existingSecret -}}
{{- end -}}

{{/* Paths inside the container. */}}
{{- define "strobe.configPath" -}}/etc/strobe/strobe.yaml{{- end -}}
{{- define "strobe.httpTokenPath" -}}/etc/strobe/http-token/{{ .Values.http.token.key }}{{- end -}}

{{/*
The agent's config file: .Values.config plus what the remote store and local store
values mean in option names. Options the chart owns are refused here.
*/}}
{{- define "strobe.agentConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- range $owned := list "http_address" "http_token_file" "local_store" "cache_dir" "node_name" -}}
{{- if hasKey $config $owned -}}
{{- fail (printf "config.%s is set by the chart (see values.yaml); remove it from config" $owned) -}}
{{- end -}}
{{- end -}}
{{- $local := .Values.localStore -}}
{{- if $local.enabled -}}
{{- $_ := set $config "local_store_max_bytes" $local.maxBytes -}}
{{- $_ := set $config "local_store_max_age" $local.maxAge -}}
{{- else -}}
{{- if not .Values.remoteStore.address -}}
{{- fail "localStore.enabled=false needs remoteStore.address, or profiles go nowhere" -}}
{{- end -}}
{{- $_ := set $config "no_local_store" true -}}
{{- end -}}
{{- with .Values.remoteStore -}}
{{- if .address -}}
{{- $_ := set $config "remote_store_address" .address -}}
{{- $_ := set $config "remote_store_protocol" .protocol -}}
{{- $_ := set $config "remote_store_insecure" .insecure -}}
{{- $_ := set $config "remote_store_insecure_skip_verify" .insecureSkipVerify -}}
{{- if .headers -}}
{{- $_ := set $config "remote_store_headers" .headers -}}
{{- end -}}
{{- if .bearerToken.existingSecret -}}
{{- $_ := set $config "remote_store_bearer_token_file" (printf "/etc/strobe/remote-store/bearer/%s" .bearerToken.key) -}}
{{- end -}}
{{- if .tls.existingSecret -}}
{{- if .tls.caKey -}}
{{- $_ := set $config "remote_store_ca_file" (printf "/etc/strobe/remote-store/tls/%s" .tls.caKey) -}}
{{- end -}}
{{- if and .tls.certKey .tls.keyKey -}}
{{- $_ := set $config "remote_store_cert_file" (printf "/etc/strobe/remote-store/tls/%s" .tls.certKey) -}}
{{- $_ := set $config "remote_store_key_file" (printf "/etc/strobe/remote-store/tls/%s" .tls.keyKey) -}}
{{- else if or .tls.certKey .tls.keyKey -}}
{{- fail "remoteStore.tls: set both certKey and keyKey for mutual TLS, or neither" -}}
{{- end -}}
{{- end -}}
{{- if .spool -}}
{{- $_ := set $config "remote_store_spool_dir" "/var/lib/strobe/spool" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Linux capabilities of the agent container (see values.yaml securityContext). */}}
{{- define "strobe.capabilities" -}}
{{- $caps := list "BPF" "PERFMON" "SYS_PTRACE" "CHECKPOINT_RESTORE" "DAC_READ_SEARCH" "SYSLOG" -}}
{{- if .Values.securityContext.sysAdmin -}}
{{- $caps = append $caps "SYS_ADMIN" -}}
{{- end -}}
{{- toYaml (concat $caps .Values.securityContext.extraCapabilities | uniq) -}}
{{- end -}}

{{- define "strobe.checkMonitoring" -}}
{{- if and (not .Values.http.expose) (or .Values.serviceMonitor.enabled .Values.podMonitor.enabled) -}}
{{- fail "http.expose=false binds the agent to 127.0.0.1, out of Prometheus' reach: disable serviceMonitor and podMonitor, or expose it" -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) -}}
{{- fail "serviceMonitor.enabled needs service.enabled (it selects the Service)" -}}
{{- end -}}
{{- end -}}
