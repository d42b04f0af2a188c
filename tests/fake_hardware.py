"""Hardware descriptions for planner tests: machines this suite never runs on."""

from __future__ import annotations

from llmops.hardware import CPU, GIB, GPU, RAM, Disk, Hardware, NumaNode

_CPU_AVX2 = CPU(model="test CPU", usable_cores=2, isa=("avx2",))
_BIG_CPU = CPU(model="test server", usable_cores=64, isa=("avx2", "avx512f"))


def cpu_only(ram_gib: float = 24, isa: tuple[str, ...] = ("avx2",), *, cores: int = 2,
             node_available_gib: float | None = None) -> Hardware:
    """A CPU machine; `node_available_gib` adds the single NUMA node vLLM binds to, with that much available
    (on VMs it can be far below the RAM: 3.7-17 GiB of 23.5 GiB were seen)."""
    nodes = ()
    if node_available_gib is not None:
        nodes = (NumaNode(0, int(node_available_gib * 1.05 * GIB), int(node_available_gib * GIB),
                          tuple(range(cores)), cores),)
    return Hardware(cpu=CPU("test CPU", cores, isa), ram=RAM(int(ram_gib * GIB), int(ram_gib * 0.95 * GIB)),
                    disk=Disk("/tmp", 100 * GIB), numa_nodes=nodes)


def gpus(count: int, memory_gib: float, name: str = "NVIDIA Test", cc: str = "9.0") -> Hardware:
    return Hardware(
        cpu=_BIG_CPU, ram=RAM(512 * GIB, 500 * GIB), disk=Disk("/tmp", 1000 * GIB),
        gpus=tuple(GPU(i, name, int(memory_gib * GIB), int(memory_gib * GIB * 0.98), cc) for i in range(count)),
    )


ONE_24GIB_GPU = gpus(1, 24, "NVIDIA GeForce RTX 4090", "8.9")
EIGHT_80GIB_GPUS = gpus(8, 80, "NVIDIA H100 80GB HBM3", "9.0")
