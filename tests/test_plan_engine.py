"""The planner's auto settings against a real vLLM on this machine (issue 9): the README's demo, with nothing
set by hand, must start, whatever the NUMA node vLLM binds to has free."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


@pytest.mark.engine
def test_demo_batch_with_the_auto_plan_starts_within_the_numa_nodes_memory(default_model_dir, tmp_path):
    from llmops.hardware import GIB, detect
    from llmops.plan import engine_cores

    out = tmp_path / "demo"
    dry = run_cli("batch", str(REPO / "examples" / "prompts.jsonl"), "-o", str(out), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["plan"]
    hw = detect()
    # The planned cache and the weights fit in what vLLM's NUMA node has available now, or, on a machine that
    # shows no NUMA node, in the RAM available (the check runs on every machine).
    node = hw.engine_numa_node
    room = node.memory_available_bytes if node is not None else hw.ram.available_bytes
    assert (plan["cpu_kv_cache_gib"] + plan["weights_gib"]) * GIB < room, (plan, room / GIB)
    assert plan["cpu_reserved_cores"] == (0 if engine_cores(hw) <= 4 else 1)
    proc = run_cli("batch", str(REPO / "examples" / "prompts.jsonl"), "-o", str(out), "--max-tokens", "8",
                   "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rows_ok"] == summary["rows_total"] > 0
    assert Path(summary["output_dir"]) == out

