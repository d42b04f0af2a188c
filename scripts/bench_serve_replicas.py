"""Benchmark (issue 23): one engine against two replicas behind one endpoint, under the same bursty load.

    LLMOPS_HOME=... flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_serve_replicas.py  # ~10 min

Setups, each a fresh `llmops serve` with the planned engine and admission (no flags beyond these):
- `single`: one engine on all the cores (the plain single server);
- `replicas`: `--replicas 2`, two engines on this machine, each on its own cores, behind Ray Serve's proxy;
- `ray`: `--ray ADDRESS`, one replica per node of a 2-node local Ray cluster (tests/ray_cluster.py).
The load is `vllm bench serve`'s bursty load (gamma arrivals, `--burstiness 0.3`) at --rate, as
scripts/bench_serve_traffic.py runs it; goodput counts the requests/s whose TTFT met the 2 s SLO. Goal: the
better 2-replica setup >= 1.2x the goodput of `single`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_serve_traffic import SLO_MS, bench, start, stop  # noqa: E402

from llmops.serve.config import ServeConfig  # noqa: E402
from llmops.serve.server import free_port, plan_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry alias, folder or hub id [smollm2-135m]")
    parser.add_argument("--prompts", type=int, default=80, help="requests per setup")
    for flag, tokens in (("--input-len", 256), ("--output-len", 128)):
        parser.add_argument(flag, type=int, default=tokens, help=f"tokens [{tokens}]")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s (bursty)")
    parser.add_argument("--setups", default="single,replicas,ray")
    parser.add_argument("--json-out", type=Path)
    parser.set_defaults(ramp_end=12)  # bench() builds every load's flags; only the bursty one runs
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-replicas-"))
    plan = plan_server(ServeConfig(model=args.model))
    rows: dict[str, dict] = {}
    for name in args.setups.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "llmops", "serve", *([args.model] if args.model else []), "--port", str(port)]
        cluster, env = None, {}
        if name == "replicas":
            command += ["--replicas", "2"]
        elif name == "ray":
            from tests.ray_cluster import LocalRayCluster

            cluster = LocalRayCluster(cpus_per_node=1, nodes=2).start()
            command += ["--ray", cluster.address]
            env = cluster.env
        print(f"[{name}] {' '.join(command)}", file=sys.stderr)
        try:
            proc = start(command, env, url, work / f"{name}.log")
            try:
                row = bench(url, plan.served_model_name, plan.model_path, "bursty", args, work / name)
            finally:
                stop(proc)
        finally:
            if cluster:
                cluster.stop()
        saved = json.loads((work / name / "bursty.json").read_text())
        rows[name] = {**row, "req_s": saved["request_throughput"], "tok_s": saved["output_throughput"]}
        print(f"[{name}] " + ", ".join(f"{k} {v:.2f}" for k, v in rows[name].items()), file=sys.stderr)

    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    print(f"\n{args.prompts} requests, bursty at {args.rate}/s, {args.input_len} in / {args.output_len} out; "
          f"goodput: requests/s with TTFT <= {SLO_MS} ms; TTFT of the completed requests; logs in {work}")
    print(f"{'setup':<10}{'done':>5}{'503':>5}{'failed':>7}{'req/s':>7}{'tok/s':>7}{'TTFT p50':>10}{'p99':>8}"
          f"{'goodput':>9}{'vs single':>10}")
    base = rows.get("single", {}).get("goodput")
    for name, r in rows.items():
        ratio = f"{r['goodput'] / base:.2f}x" if base else "-"
        print(f"{name:<10}{r['completed']:>5}{r['refused']:>5}{r['failed']:>7}{r['req_s']:>7.2f}{r['tok_s']:>7.0f}"
              f"{r['ttft_p50']:>10.0f}{r['ttft_p99']:>8.0f}{r['goodput']:>9.2f}{ratio:>10}")


if __name__ == "__main__":
    main()
