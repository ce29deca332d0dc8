{{/* Names and labels. */}}
{{- define "worker-pool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "worker-pool.fullname" -}}
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

{{/* The exporter's name: the Service KEDA calls has it. */}}
{{- define "worker-pool.exporterName" -}}
{{- printf "%s-exporter" (include "worker-pool.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "worker-pool.pool" -}}
{{- default .Release.Name .Values.pool -}}
{{- end -}}

{{- define "worker-pool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries besides the name and instance. */}}
{{- define "worker-pool.metaLabels" -}}
helm.sh/chart: {{ include "worker-pool.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
worker-pools.io/pool: {{ include "worker-pool.pool" . | quote }}
{{- end -}}

{{- define "worker-pool.labels" -}}
app.kubernetes.io/name: {{ include "worker-pool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "worker-pool.metaLabels" . }}
{{- end -}}

{{- define "worker-pool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "worker-pool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "worker-pool.exporterSelectorLabels" -}}
app.kubernetes.io/name: {{ include "worker-pool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: exporter
{{- end -}}

{{- define "worker-pool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "worker-pool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* WORKER_QUEUES: name[:weight][,name[:weight]...] */}}
{{- define "worker-pool.queues" -}}
{{- $out := list -}}
{{- range .Values.worker.queues -}}
{{- $out = append $out (printf "%s:%d" .name (int (default 1 .weight))) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* Queue names only, for the exporter. */}}
{{- define "worker-pool.queueNames" -}}
{{- $out := list -}}
{{- range .Values.worker.queues -}}
{{- $out = append $out .name -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The in-cluster URL of the exporter's /scaling document. */}}
{{- define "worker-pool.scalingUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%d/scaling" (include "worker-pool.exporterName" .) .Release.Namespace (int .Values.exporter.port) -}}
{{- end -}}

{{- define "worker-pool.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}

{{/* The broker's environment, shared by the workers and the exporter. */}}
{{- define "worker-pool.brokerEnv" -}}
{{- $b := .Values.broker -}}
{{- if eq $b.type "redis" }}
- name: REDIS_URL
{{- if $b.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $b.redis.existingSecret }}
      key: {{ $b.redis.existingSecretKey }}
{{- else }}
  value: {{ $b.redis.url | quote }}
{{- end }}
- name: REDIS_PREFIX
  value: {{ $b.redis.prefix | quote }}
{{- else }}
- name: AMQP_URL
{{- if $b.amqp.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $b.amqp.existingSecret }}
      key: {{ $b.amqp.existingSecretKey }}
{{- else }}
  value: {{ $b.amqp.url | quote }}
{{- end }}
{{- if $b.amqp.managementExistingSecret }}
- name: AMQP_MANAGEMENT_URL
  valueFrom:
    secretKeyRef:
      name: {{ $b.amqp.managementExistingSecret }}
      key: {{ $b.amqp.managementExistingSecretKey }}
{{- else if $b.amqp.managementUrl }}
- name: AMQP_MANAGEMENT_URL
  value: {{ $b.amqp.managementUrl | quote }}
{{- end }}
- name: AMQP_QUEUE_TYPE
  value: {{ $b.amqp.queueType | quote }}
{{- end }}
{{- end -}}
