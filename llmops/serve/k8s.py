"""`llmops serve MODEL --dry-run --format k8s`: a Kubernetes Deployment and Service that run the planned server.

The pod runs `llmops serve` itself, with the planned engine settings pinned (so it runs what was planned here,
whatever the node reports) and the resources the plan needs. What makes it behave under traffic:
- readiness on `/ready`, which turns 503 as soon as the pod drains (`llmops.serve.traffic`), liveness on
  vLLM's `/health`, and a start-up probe that allows for loading the model;
- `terminationGracePeriodSeconds` a little above `--grace-period`, so Kubernetes' SIGKILL comes after
  llmops's own deadline and the streams in flight finish;
- a rolling update that starts the new pod before it stops an old one (maxUnavailable 0);
- the API key from a Secret (`llmops serve` refuses a public address without one).
"""

from __future__ import annotations

import math
import re

from llmops.errors import UsageError
from llmops.hardware import GIB
from llmops.serve.config import ServeConfig

PORT = 8000
# Kubernetes' SIGKILL comes this long after llmops's own deadline (the end of the grace period).
KILL_MARGIN_S = 5
SECRET_KEY = "api-key"


def manifest(config: ServeConfig, *, ray_address: str | None = None) -> str:
    """The Deployment and Service as YAML, headed by the commands that apply them."""
    import yaml

    from llmops.hardware import detect
    from llmops.plan import CPU_ENGINE_OVERHEAD_BYTES, GPU_ENGINE_OVERHEAD_BYTES, engine_cores
    from llmops.registry import DEFAULT_MODEL
    from llmops.serve.server import plan_server

    if config.replicas == "auto":
        raise UsageError("--format k8s --replicas auto: a Deployment's replicas are a number",
                         "give --replicas N (or scale the Deployment with a HorizontalPodAutoscaler)")
    # The pod listens on every interface; its key comes from the Secret, not from this machine. Each pod is one
    # engine: `--replicas N` are N pods behind the Service, not N engines in a pod.
    pod_config = config.model_copy(update={"host": "0.0.0.0", "port": PORT, "api_key": None,
                                           "allow_unauthenticated": True, "replicas": None})
    plan = plan_server(pod_config, download=False, ray_address=ray_address)
    engine = plan.engine
    if engine.pipeline_parallel_size > 1:
        raise UsageError("--format k8s describes one pod, and this engine spans "
                         f"{engine.pipeline_parallel_size} nodes", "use a model that fits on one node")
    name = _dns_name("llmops-" + plan.served_model_name)
    secret = f"{name}-api-key"

    if engine.device == "cpu":
        pins = {"cpu_kv_cache_gib": engine.cpu_kv_cache_gib, "cpu_reserved_cores": engine.cpu_reserved_cores}
        memory = engine.weights_gib * GIB + (engine.cpu_kv_cache_gib or 0) * GIB + CPU_ENGINE_OVERHEAD_BYTES
        cores = engine_cores(detect())
        resources = {"requests": {"cpu": str(cores), "memory": _gib(memory)},
                     "limits": {"cpu": str(cores), "memory": _gib(memory)}}
    else:
        pins = {"tensor_parallel_size": engine.tensor_parallel_size,
                "data_parallel_size": engine.data_parallel_size,
                "gpu_memory_utilization": engine.gpu_memory_utilization}
        gpus = engine.tensor_parallel_size * engine.data_parallel_size
        memory = engine.weights_gib * GIB + GPU_ENGINE_OVERHEAD_BYTES * gpus  # host RAM while loading
        resources = {"requests": {"memory": _gib(memory)},
                     "limits": {"nvidia.com/gpu": str(gpus), "memory": _gib(memory)}}
    pins.update(dtype=engine.dtype, max_model_len=engine.max_model_len, enforce_eager=str(engine.enforce_eager).lower())
    args = ["serve", config.model or DEFAULT_MODEL, "--host", "0.0.0.0", "--port", str(PORT),
            *(a for adapter in config.adapters for a in ("--adapter", adapter)),
            "--grace-period", f"{config.grace_period_s:g}", "--ttft-target-ms", f"{config.ttft_target_ms:g}",
            "--max-queue", str(engine.max_num_queued_reqs or 0),
            *(a for key, value in pins.items() if value is not None for a in ("--set", f"engine.{key}={value}")),
            *(["--set", f"served_model_name={config.served_model_name}"] if config.served_model_name else []),
            *(["--", *config.vllm_args] if config.vllm_args else [])]

    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "llmops"}
    probe = lambda path, period, failures: {  # noqa: E731
        "httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5,
        "failureThreshold": failures}
    container = {
        "name": "llmops-serve",
        "image": "llmops:latest",  # an image with llmops and vLLM (the cpu or gpu extra) installed
        "command": ["llmops"],
        "args": args,
        "env": [{"name": "LLMOPS_API_KEY",
                 "valueFrom": {"secretKeyRef": {"name": secret, "key": SECRET_KEY}}}],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # vLLM's own `/health`: a pod whose engine has died is restarted.
        "livenessProbe": probe("/health", 10, 3),
        # `/ready` answers 503 from the first moment of a drain: the pod leaves the Service at once.
        "readinessProbe": probe("/ready", 5, 1),
        # Loading the model takes 30 s to many minutes: liveness waits until it has answered once.
        "startupProbe": probe("/health", 10, math.ceil(config.startup_timeout_s / 10)),
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],  # vLLM's processes share tensors here
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": config.replicas or 1,
            "selector": {"matchLabels": labels},
            # A restart starts the new pod before it stops the old one, which drains.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": math.ceil(config.grace_period_s) + KILL_MARGIN_S,
                    "containers": [container],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": PORT, "targetPort": "http",
                                                "protocol": "TCP"}]},
    }
    header = "\n".join([
        f"# {_command_line(config)}",
        f"# The API key comes from a Secret; create it once: kubectl create secret generic {secret} "
        f"--from-literal={SECRET_KEY}=$(openssl rand -hex 16)",
        "# Then: kubectl apply -f THIS_FILE. Clients reach http://" + name + f":{PORT}/v1 inside the cluster.",
        *(f"# plan: {note}" for note in engine.notes),
    ])

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # the labels repeat as themselves, not as &id001/*id001
            return True

    return header + "\n" + yaml.dump_all([deployment, service], Dumper=Dumper, sort_keys=False, width=120)


def _dns_name(text: str) -> str:
    """A Kubernetes object name (DNS-1123 label: lower case, digits and '-', at most 63)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")


def _gib(n_bytes: float) -> str:
    return f"{math.ceil(n_bytes / GIB)}Gi"


def _command_line(config: ServeConfig) -> str:
    replicas = f" --replicas {config.replicas}" if config.replicas else ""
    return f"llmops serve {config.model or ''}{replicas} --dry-run --format k8s".replace("  ", " ")
