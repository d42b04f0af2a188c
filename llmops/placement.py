"""Where engines run: cores for each CPU engine of a host, GPU groups, engine replicas on Ray nodes.

Shared by every workload that runs several engines (batch's worker processes and Ray replicas; serve's
replicas later): each decides here, and only here, which hardware an engine gets. Nothing in this module
starts anything or imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmops.errors import UsageError


def host_cores(cores: list[int], slot: int, engines: int) -> list[int]:
    """Engine `slot`'s even share of this host's cores (one core each, shared round-robin, if there are more
    engines than cores). vLLM's automatic binding would put every engine of a host on the same cores
    (measured: 2 engines on 2 cores, 273 tok/s bound alike against 1160 apart)."""
    cores = sorted(cores)
    share = cores[slot * len(cores) // engines:(slot + 1) * len(cores) // engines]
    return share or cores[slot % len(cores):slot % len(cores) + 1]


def gpu_group(gpu_indices: list[int], tensor_parallel_size: int, rank: int) -> list[int]:
    """The physical GPU indices of engine `rank`: consecutive groups of tensor_parallel_size GPUs."""
    tp = tensor_parallel_size
    return gpu_indices[rank * tp:(rank + 1) * tp]


@dataclass(frozen=True)
class Replica:
    """One engine placed on one Ray node."""

    rank: int
    node_id: str
    node_ip: str
    cpus: float
    gpus: int
    host_slot: int = 0
    """Its place among the replicas on the same host (several Ray nodes may share one machine)."""
    host_replicas: int = 1


def plan_replicas(nodes: list[dict[str, Any]], plan) -> list[Replica]:
    """One replica per live CPU node (the whole node: vLLM's CPU engine uses every core it is given), or one
    per group of tensor_parallel_size GPUs on each GPU node. `nodes` as `ray.nodes()` lists them."""
    found: list[Replica] = []
    for node in sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"]):
        resources = node.get("Resources", {})
        cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if plan.device == "cuda":
            tp = plan.tensor_parallel_size
            for _ in range(gpus // tp):
                found.append(Replica(len(found), node["NodeID"], node["NodeManagerAddress"], 1.0, tp))
        elif cpus >= 1:
            found.append(Replica(len(found), node["NodeID"], node["NodeManagerAddress"], cpus, 0))
    if not found:
        need = (f"{plan.tensor_parallel_size} GPU(s)" if plan.device == "cuda" else "1 CPU")
        raise UsageError(f"the Ray cluster has no live node with {need} for an engine replica; add nodes "
                         "(`ray start --address HEAD:PORT`) or check `ray status`")
    by_host: dict[str, list[int]] = {}
    for r in found:
        by_host.setdefault(r.node_ip, []).append(r.rank)
    return [Replica(r.rank, r.node_id, r.node_ip, r.cpus, r.gpus, by_host[r.node_ip].index(r.rank),
                    len(by_host[r.node_ip])) for r in found]
