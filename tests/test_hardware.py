import json

import pytest

from llmops import hardware
from llmops.hardware import Hardware

pytestmark = pytest.mark.unit


def test_probes_on_this_machine_never_raise_and_are_sane():
    hw = Hardware(cpu=hardware.probe_cpu(), ram=hardware.probe_ram(), disk=hardware.probe_disk("/nonexistent/x"),
                  gpus=hardware.probe_gpus())
    assert hw.cpu.usable_cores >= 1
    assert hw.ram.total_bytes > 0 and 0 <= hw.ram.available_bytes <= hw.ram.total_bytes
    assert hw.disk.free_bytes > 0  # found through the nearest existing parent folder


def test_nvidia_smi_parsing():
    gpus = hardware.parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0\n"
                                     "1, Tesla T4, 15360, 15000, 7.5\ngarbage line\n")
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    assert gpus[0].memory_total_bytes == 81559 * 1024**2
    assert gpus[0].supports_bf16 and not gpus[1].supports_bf16


def test_cuda_visible_devices_filters(monkeypatch):
    monkeypatch.setattr(hardware, "_gpus_from_nvml", lambda: hardware.parse_nvidia_smi(
        "0, A, 1000, 900, 8.0\n1, B, 1000, 900, 8.0\n2, C, 1000, 900, 8.0\n"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert [g.name for g in hardware.probe_gpus()] == ["A", "C"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.probe_gpus() == ()


def test_json_round_trip_and_fake_hardware_file(tmp_path, monkeypatch):
    from tests.fake_hardware import EIGHT_80GIB_GPUS

    data = EIGHT_80GIB_GPUS.to_dict()
    assert data["gpus"][0]["supports_bf16"] is True
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    assert Hardware.from_dict(json.loads(path.read_text())) == EIGHT_80GIB_GPUS
    monkeypatch.setenv("LLMOPS_HARDWARE", str(path))
    hardware.detect.cache_clear()
    try:
        assert hardware.detect() == EIGHT_80GIB_GPUS
    finally:
        hardware.detect.cache_clear()


def test_numa_nodes_read_as_vllm_reads_them(tmp_path):
    # A VM whose node 0 holds far less than /proc/meminfo's total: vLLM counts free + file pages + reclaimable.
    node = tmp_path / "node" / "node0"
    node.mkdir(parents=True)
    (node / "meminfo").write_text("Node 0 MemTotal:        9005276 kB\nNode 0 MemFree:         6271612 kB\n"
                                  "Node 0 Active(file):     256112 kB\nNode 0 Inactive(file):  2136960 kB\n"
                                  "Node 0 SReclaimable:     193700 kB\nNode 0 HugePages_Total:     0\n")
    (node / "cpulist").write_text("0-1\n")
    (tmp_path / "node" / "online").write_text("0\n")  # not a node folder
    nodes = hardware.probe_numa_nodes(tmp_path)
    assert len(nodes) == 1
    assert nodes[0].memory_total_bytes == 9005276 * 1024
    assert nodes[0].memory_available_bytes == (6271612 + 256112 + 2136960 + 193700) * 1024
    assert set(nodes[0].cpus) <= {0, 1}
    assert hardware.probe_numa_nodes(tmp_path / "missing") == ()


def test_hardware_files_without_numa_nodes_still_load():
    from tests.fake_hardware import cpu_only

    data = cpu_only(node_available_gib=6).to_dict()
    assert Hardware.from_dict(json.loads(json.dumps(data))) == cpu_only(node_available_gib=6)
    del data["numa_nodes"]
    old = Hardware.from_dict(data)
    assert old.numa_nodes == () and old.engine_numa_node is None
