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

{{/* An image reference: repository@digest when a digest is set (the tag is then
ignored), else repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "worker-pool.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where the broker's files are mounted, in the workers and the exporter alike. */}}
{{- define "worker-pool.brokerCaDir" -}}/etc/worker-pool/broker-ca{{- end -}}
{{- define "worker-pool.brokerCaFile" -}}{{ include "worker-pool.brokerCaDir" . }}/ca.crt{{- end -}}
{{- define "worker-pool.brokerUrlDir" -}}/etc/worker-pool/broker-url{{- end -}}
{{- define "worker-pool.amqpManagementUrlDir" -}}/etc/worker-pool/amqp-management-url{{- end -}}

{{/* Checks the broker's TLS and secret-file values; renders nothing. */}}
{{- define "worker-pool.brokerChecks" -}}
{{- $b := .Values.broker -}}
{{- if and $b.tls.caSecret $b.tls.caConfigMap -}}
{{- fail "broker.tls: set caSecret or caConfigMap, not both" -}}
{{- end -}}
{{- if $b.urlFromSecretFile -}}
{{- if eq $b.type "redis" -}}
{{- if not $b.redis.existingSecret -}}
{{- fail "broker.urlFromSecretFile=true mounts broker.redis.existingSecret: set it (a Secret holding the Redis URL)" -}}
{{- end -}}
{{- else -}}
{{- if not $b.amqp.existingSecret -}}
{{- fail "broker.urlFromSecretFile=true mounts broker.amqp.existingSecret: set it (a Secret holding the AMQP URL)" -}}
{{- end -}}
{{- if and $b.amqp.managementUrl (not $b.amqp.managementExistingSecret) -}}
{{- fail "broker.urlFromSecretFile=true: broker.amqp.managementUrl would be in plain text; put it in a Secret and set broker.amqp.managementExistingSecret" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The broker's environment, shared by the workers and the exporter. With
broker.urlFromSecretFile the URLs are files of the mounted Secrets (*_URL_FILE),
read again on reconnect, so a rotated Secret is picked up. */}}
{{- define "worker-pool.brokerEnv" -}}
{{- include "worker-pool.brokerChecks" . -}}
{{- $b := .Values.broker -}}
{{- $files := $b.urlFromSecretFile -}}
{{- if eq $b.type "redis" }}
{{- if $files }}
- name: REDIS_URL_FILE
  value: {{ printf "%s/url" (include "worker-pool.brokerUrlDir" .) | quote }}
{{- else }}
- name: REDIS_URL
{{- if $b.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $b.redis.existingSecret }}
      key: {{ $b.redis.existingSecretKey }}
{{- else }}
  value: {{ $b.redis.url | quote }}
{{- end }}
{{- end }}
- name: REDIS_PREFIX
  value: {{ $b.redis.prefix | quote }}
{{- if or $b.tls.caSecret $b.tls.caConfigMap }}
- name: REDIS_CA_FILE
  value: {{ include "worker-pool.brokerCaFile" . | quote }}
{{- end }}
{{- else }}
{{- if $files }}
- name: AMQP_URL_FILE
  value: {{ printf "%s/url" (include "worker-pool.brokerUrlDir" .) | quote }}
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
{{- end }}
{{- if and $files $b.amqp.managementExistingSecret }}
- name: AMQP_MANAGEMENT_URL_FILE
  value: {{ printf "%s/url" (include "worker-pool.amqpManagementUrlDir" .) | quote }}
{{- else if $b.amqp.managementExistingSecret }}
- name: AMQP_MANAGEMENT_URL
  valueFrom:
    secretKeyRef:
      name: {{ $b.amqp.managementExistingSecret }}
      key: {{ $b.amqp.managementExistingSecretKey }}
{{- else if $b.amqp.managementUrl }}
- name: AMQP_MANAGEMENT_URL
  value: {{ $b.amqp.managementUrl | quote }}
{{- end }}
{{- if $b.amqp.managementAllowHttp }}
- name: AMQP_MANAGEMENT_ALLOW_HTTP
  value: "true"
{{- end }}
- name: AMQP_QUEUE_TYPE
  value: {{ $b.amqp.queueType | quote }}
{{- if or $b.tls.caSecret $b.tls.caConfigMap }}
- name: AMQP_CA_FILE
  value: {{ include "worker-pool.brokerCaFile" . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The volumes behind the broker's files (its CA, its URLs as files); empty when
there are none. Whole directories are mounted, never a subPath: a subPath mount
does not follow an update of its Secret or ConfigMap. */}}
{{- define "worker-pool.brokerVolumes" -}}
{{- $b := .Values.broker -}}
{{- if $b.tls.caSecret }}
- name: broker-ca
  secret:
    secretName: {{ $b.tls.caSecret }}
    items:
      - key: {{ $b.tls.caKey }}
        path: ca.crt
{{- else if $b.tls.caConfigMap }}
- name: broker-ca
  configMap:
    name: {{ $b.tls.caConfigMap }}
    items:
      - key: {{ $b.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if $b.urlFromSecretFile }}
{{- $secret := ternary $b.redis.existingSecret $b.amqp.existingSecret (eq $b.type "redis") }}
{{- $key := ternary $b.redis.existingSecretKey $b.amqp.existingSecretKey (eq $b.type "redis") }}
- name: broker-url
  secret:
    secretName: {{ $secret }}
    items:
      - key: {{ $key }}
        path: url
{{- if and (eq $b.type "amqp") $b.amqp.managementExistingSecret }}
- name: amqp-management-url
  secret:
    secretName: {{ $b.amqp.managementExistingSecret }}
    items:
      - key: {{ $b.amqp.managementExistingSecretKey }}
        path: url
{{- end }}
{{- end }}
{{- end -}}

{{- define "worker-pool.brokerVolumeMounts" -}}
{{- $b := .Values.broker -}}
{{- if or $b.tls.caSecret $b.tls.caConfigMap }}
- name: broker-ca
  mountPath: {{ include "worker-pool.brokerCaDir" . }}
  readOnly: true
{{- end }}
{{- if $b.urlFromSecretFile }}
- name: broker-url
  mountPath: {{ include "worker-pool.brokerUrlDir" . }}
  readOnly: true
{{- if and (eq $b.type "amqp") $b.amqp.managementExistingSecret }}
- name: amqp-management-url
  mountPath: {{ include "worker-pool.amqpManagementUrlDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Whether KEDA reads the exporter's /scaling. */}}
{{- define "worker-pool.kedaReadsExporter" -}}
{{- if and .Values.autoscaling.enabled (eq .Values.autoscaling.engine "keda") (has .Values.autoscaling.keda.trigger (list "exporter" "exporter-push")) .Values.exporter.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* Whether KEDA's external-push trigger reads the exporter's gRPC service. */}}
{{- define "worker-pool.kedaPushes" -}}
{{- if and (include "worker-pool.kedaReadsExporter" .) (eq .Values.autoscaling.keda.trigger "exporter-push") -}}
true
{{- end -}}
{{- end -}}

{{/* host:port of the exporter's gRPC service, for the external-push trigger. */}}
{{- define "worker-pool.scalerAddress" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "worker-pool.exporterName" .) .Release.Namespace (int .Values.exporter.grpcPort) -}}
{{- end -}}

{{/* Whether the pod-deletion-cost admission policy is installed: asked for, and a
cluster that has ValidatingAdmissionPolicy v1 (Kubernetes 1.30 or later). */}}
{{- define "worker-pool.admissionPolicy" -}}
{{- $p := .Values.podDeletionCost -}}
{{- if and $p.enabled $p.admissionPolicy.enabled -}}
{{- if or (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The admission policy and its binding are cluster-scoped: the name carries the
namespace. */}}
{{- define "worker-pool.admissionPolicyName" -}}
{{- printf "%s-pod-deletion-cost.%s" (include "worker-pool.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "." | trimSuffix "-" -}}
{{- end -}}

{{/* Egress both the workers and the exporter need: DNS, and the broker. A rule
never has an empty `to` but DNS's when no DNS peers are given (port 53 anywhere). */}}
{{- define "worker-pool.egressRules" -}}
{{- $egress := .Values.networkPolicy.egress -}}
- ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
  {{- with $egress.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
- to:
    {{- toYaml $egress.brokerTo | nindent 4 }}
  {{- with $egress.brokerPorts }}
  ports:
    {{- range . }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- end }}
{{- end -}}
