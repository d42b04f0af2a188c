"""What hardware is here: NVIDIA GPUs, CPU, RAM and disk. Every probe returns a frozen dataclass and never
raises (a probe that fails reports "nothing found"), and nothing here imports torch.

`LLMOPS_HARDWARE=FILE.json` replaces detection with a description of another machine (the JSON form of
`Hardware`, as `llmops hw --json` prints it), to plan for hardware you do not have. Its optional `nodes` list
describes a cluster: every machine one engine may span (this one first), e.g. 2 nodes of 8 x 80 GiB GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str
    """Like "9.0"; bf16 needs 8.0 (Ampere) or newer."""

    @property
    def supports_bf16(self) -> bool:
        try:
            return float(self.compute_capability) >= 8.0
        except ValueError:
            return False


@dataclass(frozen=True)
class CPU:
    model: str
    usable_cores: int
    """Cores this process may use: the affinity mask, capped by a cgroup CPU quota."""
    isa: tuple[str, ...]
    """Instruction-set extensions that matter for inference, e.g. ("avx2", "avx512f", "amx_bf16")."""

    @property
    def has_native_bf16(self) -> bool:
        """bf16 matmuls run at speed only with AVX512-BF16 or AMX; elsewhere they are emulated and slow."""
        return "avx512_bf16" in self.isa or "amx_bf16" in self.isa


@dataclass(frozen=True)
class RAM:
    total_bytes: int
    """Physical memory, capped by the cgroup limit when one is set."""
    available_bytes: int


@dataclass(frozen=True)
class NumaNode:
    """A NUMA node as vLLM's CPU worker sees it. On VMs a node can hold much less memory than /proc/meminfo's
    total (seen: node 0 had 3.7-17 GiB of a 23.5 GiB machine), and vLLM refuses a KV cache larger than what
    is available on the node it binds to."""

    index: int
    memory_total_bytes: int
    memory_available_bytes: int
    """MemFree + file pages + reclaimable slab, capped by the cgroup: the sum vLLM's CPU worker compares the KV
    cache with (`vllm/utils/cpu_resource_utils.py: get_memory_node_info`)."""
    cpus: tuple[int, ...] = ()
    """Logical CPUs of this node that this process may use."""
    physical_cores: int = 0
    """Physical cores among `cpus`; vLLM binds one OpenMP thread per physical core on x86."""


@dataclass(frozen=True)
class Disk:
    path: str
    free_bytes: int


@dataclass(frozen=True)
class ClusterNode:
    """One machine of a cluster (a Ray node), as much as planning an engine across machines needs."""

    name: str
    cpus: int
    gpus: tuple[GPU, ...] = ()
    ram_bytes: int = 0
    address: str = ""
    """Where the other nodes reach it (its Ray node IP); empty when not known."""

    @classmethod
    def from_dict(cls, data: dict) -> ClusterNode:
        gpu_fields = {f.name for f in dataclasses.fields(GPU)}
        return cls(name=str(data.get("name", "")), cpus=int(data.get("cpus", 0)),
                   gpus=tuple(GPU(**{k: v for k, v in g.items() if k in gpu_fields}) for g in data.get("gpus", [])),
                   ram_bytes=int(data.get("ram_bytes", 0)), address=str(data.get("address", "")))


@dataclass(frozen=True)
class Hardware:
    cpu: CPU
    ram: RAM
    disk: Disk
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    numa_nodes: tuple[NumaNode, ...] = field(default_factory=tuple)
    """Empty where the kernel exposes no nodes (or in hardware files written before this field existed)."""
    nodes: tuple[ClusterNode, ...] = field(default_factory=tuple)
    """The cluster this machine plans for, this machine (the head) first; empty for one machine. Set from
    `LLMOPS_HARDWARE`'s `nodes` list, or from a live Ray cluster (`with_cluster`)."""

    @property
    def is_cluster(self) -> bool:
        return len(self.nodes) > 1

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def engine_numa_node(self) -> NumaNode | None:
        return engine_numa_node(self.numa_nodes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for gpu, raw in zip(self.gpus, data["gpus"]):
            raw["supports_bf16"] = gpu.supports_bf16
        data["cpu"]["has_native_bf16"] = self.cpu.has_native_bf16
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        gpu_fields = {f.name for f in dataclasses.fields(GPU)}
        cpu_fields = {f.name for f in dataclasses.fields(CPU)}
        return cls(
            cpu=CPU(**{k: (tuple(v) if k == "isa" else v) for k, v in data["cpu"].items() if k in cpu_fields}),
            ram=RAM(**data["ram"]),
            disk=Disk(**data.get("disk", {"path": "/", "free_bytes": 0})),
            gpus=tuple(GPU(**{k: v for k, v in g.items() if k in gpu_fields}) for g in data.get("gpus", [])),
            numa_nodes=tuple(NumaNode(**{k: (tuple(v) if k == "cpus" else v) for k, v in n.items()})
                             for n in data.get("numa_nodes", [])),
            nodes=tuple(ClusterNode.from_dict(n) for n in data.get("nodes", [])),
        )

    def with_cluster(self, nodes: tuple[ClusterNode, ...]) -> Hardware:
        return dataclasses.replace(self, nodes=nodes)


@cache
def detect() -> Hardware:
    """The hardware of this machine (or of `$LLMOPS_HARDWARE`), probed once per process."""
    if fake := os.environ.get("LLMOPS_HARDWARE"):
        return Hardware.from_dict(json.loads(Path(fake).read_text()))
    from llmops.paths import llmops_home

    return Hardware(cpu=probe_cpu(), ram=probe_ram(), disk=probe_disk(llmops_home()), gpus=probe_gpus(),
                    numa_nodes=probe_numa_nodes())


# --- GPUs ---------------------------------------------------------------------------------------------


def probe_gpus() -> tuple[GPU, ...]:
    """NVIDIA GPUs through NVML, else `nvidia-smi`; honours CUDA_VISIBLE_DEVICES given as indices."""
    gpus = _gpus_from_nvml()
    if gpus is None:
        gpus = _gpus_from_nvidia_smi()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        if wanted or visible.strip() in ("", "-1"):
            gpus = tuple(g for g in gpus if g.index in wanted)
    return gpus


def _gpus_from_nvml() -> tuple[GPU, ...] | None:
    try:
        import pynvml  # from nvidia-ml-py, present on GPU installs

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GPU(i, name if isinstance(name, str) else name.decode(), int(mem.total), int(mem.free),
                            f"{major}.{minor}"))
        return tuple(gpus)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpus_from_nvidia_smi() -> tuple[GPU, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free,compute_cap",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except Exception:
        return ()
    return parse_nvidia_smi(out)


def parse_nvidia_smi(csv_text: str) -> tuple[GPU, ...]:
    gpus = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            index, name, total_mib, free_mib, cc = int(parts[0]), parts[1], int(parts[2]), int(parts[3]), parts[4]
        except ValueError:
            continue
        gpus.append(GPU(index, name, total_mib * 1024**2, free_mib * 1024**2, cc))
    return tuple(gpus)


# --- CPU ----------------------------------------------------------------------------------------------

_INTERESTING_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def probe_cpu() -> CPU:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model == "unknown":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return CPU(model=model, usable_cores=usable_cores(),
               isa=tuple(f for f in _INTERESTING_ISA if f in flags))


def usable_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = max(1, min(cores, int(quota)))
    return cores


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


# --- RAM and disk -------------------------------------------------------------------------------------


def probe_ram() -> RAM:
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            m = re.match(r"(\w+):\s+(\d+)", line)
            if m:
                info[m.group(1)] = int(m.group(2)) * 1024
    except OSError:
        pass
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", total)
    limit, used = _cgroup_memory()
    if limit is not None and (total == 0 or limit < total):
        total = limit
        available = min(available, max(0, limit - (used or 0)))
    return RAM(total_bytes=total, available_bytes=available)


def _cgroup_memory() -> tuple[int | None, int | None]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        # v1 reports "no limit" as a huge number near 2**63.
        if raw == "max" or int(raw) >= 2**60:
            return None, None
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = None
        return int(raw), used
    return None, None


def probe_numa_nodes(root: str | Path = "/sys/devices/system") -> tuple[NumaNode, ...]:
    """Every NUMA node in this process's memory policy (`Mems_allowed_list`), read the way vLLM reads them."""
    try:
        return _numa_nodes(Path(root))
    except Exception:  # a probe never raises: an odd sysfs means "no nodes known"
        return ()


def _numa_nodes(root: Path) -> tuple[NumaNode, ...]:
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    mems = _mems_allowed()
    limit, used = _cgroup_memory()
    nodes = []
    node_dirs = [d for d in (root / "node").glob("node*") if d.name[4:].isdigit()]
    for node_dir in sorted(node_dirs, key=lambda d: int(d.name[4:])):
        index = int(node_dir.name[4:])
        if mems is not None and index not in mems:
            continue
        info = _node_meminfo(node_dir / "meminfo")
        if info is None:
            continue
        total = info.get("MemTotal", 0)
        available = sum(info.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
        if limit is not None and limit < total:  # as vLLM does: cgroups have no per-node limit
            total, available = limit, max(0, min(available, limit - (used or 0)))
        cpus = tuple(c for c in _read_id_list(node_dir / "cpulist") if c in allowed)
        nodes.append(NumaNode(index, total, available, cpus, _physical_cores(root, cpus)))
    return tuple(nodes)


def engine_numa_node(nodes: tuple[NumaNode, ...]) -> NumaNode | None:
    """The node a single vLLM CPU engine binds to and allocates its KV cache on: that of the first usable CPU
    (vLLM takes `get_allowed_cpu_list()[0].numa_node`). None when nodes are unknown."""
    with_cpus = [n for n in nodes if n.cpus]
    return min(with_cpus, key=lambda n: min(n.cpus)) if with_cpus else None


def _mems_allowed() -> set[int] | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                return set(_parse_id_list(line.split(":", 1)[1].strip()))
    except (OSError, ValueError):
        pass
    return None


def _node_meminfo(path: Path) -> dict[str, int] | None:
    """`Node 0 MemFree: 6271612 kB` lines, in bytes."""
    try:
        text = path.read_text()
    except OSError:
        return None
    info = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].isdigit():
            info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    return info


def _read_id_list(path: Path) -> list[int]:
    try:
        return _parse_id_list(path.read_text().strip())
    except (OSError, ValueError):
        return []


def _parse_id_list(raw: str) -> list[int]:
    """"0-2,4" -> [0, 1, 2, 4]."""
    ids: list[int] = []
    for part in filter(None, raw.split(",")):
        start, _, end = part.partition("-")
        ids.extend(range(int(start), int(end or start) + 1))
    return sorted(set(ids))


def _physical_cores(root: Path, cpus: tuple[int, ...]) -> int:
    cores = set()
    for cpu in cpus:
        topology = root / "cpu" / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" +
                      (topology / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")  # no topology: count the logical CPU as a core
    return len(cores)


def probe_disk(path: Path) -> Disk:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 0
    return Disk(path=str(path), free_bytes=free)
