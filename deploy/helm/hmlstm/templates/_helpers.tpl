{{/* The image reference: pinned by digest when one is given. */}}
{{- define "hmlstm.image" -}}
{{- $repo := required "image.repository is not set: build the image (Dockerfile, or Dockerfile.gpu for the GPU overlay), push it to your registry, and pass --set image.repository=REGISTRY/hmlstm (this project publishes no image)" .repository -}}
{{- if .digest -}}{{ $repo }}@{{ .digest }}{{- else -}}{{ $repo }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* Why an image without a digest passes checkov: the digest is the operator's to set (values.yaml). */}}
{{- define "hmlstm.digestSkip" -}}
{{- if not .digest }}
checkov.io/skip1: CKV_K8S_43=no digest is set in values (image.digest); this project publishes no image, so the digest is known only once you push yours
{{- end }}
{{- end -}}

{{- define "hmlstm.redisUrl" -}}
{{- if .Values.redis.url -}}{{ .Values.redis.url }}{{- else -}}redis://hmlstm-redis.{{ include "hmlstm.namespace" . }}.svc:6379/0{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for every container. */}}
{{- define "hmlstm.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* Every object's namespace: values' namespace (not "default", which is for nobody's workloads). */}}
{{- define "hmlstm.namespace" -}}
{{ .Values.namespace | default .Release.Namespace }}
{{- end -}}
