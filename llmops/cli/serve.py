"""`llmops serve`: an OpenAI-compatible vLLM server for one model, planned from the hardware here."""

from __future__ import annotations

import shlex
from typing import Annotated, Literal, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import (ConfigOpt, DryRunOpt, JsonOpt, ModelOpt, SetOpt, StateDirOpt, StateUrlOpt,
                                 parse_duration)
from llmops.serve.config import ServeConfig

_FIELDS = ServeConfig.model_fields


def _default(name: str) -> str:
    return rf" \[default: {_FIELDS[name].default}]"  # escaped: rich would take [default: ...] as markup



def serve_command(
    ctx: typer.Context,
    model_arg: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", show_default=False, help=_FIELDS["model"].description)] = None,
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", show_default=False, help=_FIELDS["adapters"].description + " Repeatable.")] = None,
    host: Annotated[Optional[str], typer.Option(help=_FIELDS["host"].description + _default("host"))] = None,
    port: Annotated[Optional[int], typer.Option(help=_FIELDS["port"].description + _default("port"))] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LLMOPS_API_KEY", show_envvar=True, help=_FIELDS["api_key"].description)] = None,
    allow_unauthenticated: Annotated[Optional[bool], typer.Option(
        "--allow-unauthenticated", show_default=False, help=_FIELDS["allow_unauthenticated"].description)] = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS",
        help="Plan for the nodes of a live Ray cluster (HOST:PORT, or `auto` for the one this machine belongs "
             "to): a model that fits one node runs one replica per node as a Ray Serve application behind "
             "one endpoint; a model too large for one node is served across them, pipeline parallel. Needs "
             "`pip install 'llmops[ray]'`.")] = None,
    replicas: Annotated[Optional[str], typer.Option(
        "--replicas", metavar="N|auto", show_default=False, help=_FIELDS["replicas"].description)] = None,
    min_replicas: Annotated[Optional[int], typer.Option(
        "--min-replicas", min=1, show_default=False, help=_FIELDS["min_replicas"].description)] = None,
    max_replicas: Annotated[Optional[int], typer.Option(
        "--max-replicas", min=1, show_default=False, help=_FIELDS["max_replicas"].description)] = None,
    max_queue: Annotated[Optional[int], typer.Option(
        "--max-queue", min=0, show_default=False, help=_FIELDS["max_queue"].description)] = None,
    ttft_target_ms: Annotated[Optional[float], typer.Option(
        "--ttft-target-ms", show_default=False,
        help=_FIELDS["ttft_target_ms"].description + _default("ttft_target_ms"))] = None,
    grace_period: Annotated[Optional[float], typer.Option(
        "--grace-period", metavar="SECONDS", show_default=False,
        help=_FIELDS["grace_period_s"].description + _default("grace_period_s"))] = None,
    status_every: Annotated[Optional[float], typer.Option(
        "--status-every", metavar="SECONDS", min=0, show_default=False,
        help=_FIELDS["status_every_s"].description + _default("status_every_s"))] = None,
    store: Annotated[Optional[bool], typer.Option(
        "--store/--no-store", show_default=False,
        help=_FIELDS["store"].description + " [default: store]")] = None,
    state_dir: StateDirOpt = None,
    state_url: StateUrlOpt = None,
    conversation_ttl: Annotated[Optional[str], typer.Option(
        "--conversation-ttl", metavar="DURATION", show_default=False,
        help=_FIELDS["conversation_ttl_s"].description + r" 7d, 12h, 30m or seconds. \[default: 7d]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    format_: Annotated[Literal["text", "json", "k8s"], typer.Option(
        "--format", help="With --dry-run: the plan as text, as JSON (same as --json), or as a Kubernetes "
                         "Deployment and Service (YAML) that run this plan.")] = "text",
    json: JsonOpt = False,
) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible server until Ctrl+C or SIGTERM.

    Flags after `--` go to vLLM unchanged: `llmops serve smollm2-135m -- --enable-prefix-caching`.
    LoRA adapters: `llmops serve ADAPTER`, or `llmops serve BASE --adapter A --adapter B`.
    """
    from llmops.config import load_config
    from llmops.errors import UsageError
    from llmops.serve.server import check_access, check_port_free, plan_server, ready_text, redacted, run_server

    extra = list(ctx.args)
    if model_arg is not None and model_arg.startswith("-"):  # `llmops serve -- --flag`: no MODEL given
        extra.insert(0, model_arg)
        model_arg = None
    if model_arg and model and model_arg != model:
        raise UsageError(f"two models given: {model_arg!r} and --model {model!r}", "give one of them")
    flags = {"model": model_arg or model, "host": host, "port": port, "api_key": api_key,
             "allow_unauthenticated": allow_unauthenticated, "max_queue": max_queue,
             "ttft_target_ms": ttft_target_ms, "grace_period_s": grace_period,
             "status_every_s": status_every, "replicas": replicas, "min_replicas": min_replicas,
             "max_replicas": max_replicas, "store": store, "state_dir": state_dir, "state_url": state_url,
             "conversation_ttl_s": parse_duration(conversation_ttl) if conversation_ttl is not None else None}
    cfg = load_config(ServeConfig, yaml_path=config, sets=set_, flags=flags)
    if extra:
        cfg = cfg.model_copy(update={"vllm_args": [*cfg.vllm_args, *extra]})
    if adapter:
        cfg = cfg.model_copy(update={"adapters": [*cfg.adapters, *adapter]})

    if ray is not None and cfg.replicas is not None:
        raise UsageError("--replicas runs engines on this machine; --ray runs one on each node of a cluster",
                         "give one of them (--min-replicas/--max-replicas scale them on the cluster)")
    if cfg.replicas is not None and cfg.engine.data_parallel_size == "auto":
        # Each replica is one engine: without this a GPU machine's plan would be vLLM's data parallelism.
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"data_parallel_size": 1})})
    if ray is None and (cfg.min_replicas is not None or cfg.max_replicas is not None):
        raise UsageError("--min-replicas and --max-replicas scale replicas on a Ray cluster", "add --ray ADDRESS")
    if format_ != "text" and not dry_run:
        raise UsageError(f"--format {format_} describes a plan: it needs --dry-run", "add --dry-run")
    if dry_run:
        if format_ == "k8s":
            from llmops.serve.k8s import manifest

            out.result(manifest(cfg, ray_address=ray))
            return
        if cfg.replicas is not None:
            from llmops.serve.replicas import plan_replicas_here

            _show_replicas(plan_replicas_here(cfg, download=False), json or format_ == "json")
            return
        plan = plan_server(cfg, download=False, ray_address=ray)
        if ray is not None and _show_ray_replicas(plan, cfg, ray, json or format_ == "json"):
            return
        if json or format_ == "json":
            out.print_json(plan.to_dict())
            return
        engine = plan.engine.to_dict()
        notes = engine.pop("notes", ())
        out.key_values(f"serve plan for {', '.join(plan.model_names)}", [
            ("model path", plan.model_path), *((f"adapter {n}", p) for n, p in plan.adapters.items()),
            ("url", plan.url + "/v1"),
            ("api key", "required" if plan.api_key else "none"),
            *engine.items(), *(("why", n) for n in notes)])
        for step in plan.nodes:  # an engine across nodes: the cluster first, then vLLM on the head
            out.key_values(f"on {step.node}", [("run", step.command), ("why", step.why)])
        if plan.nodes:
            out.log("then on the head (vLLM's Ray executor copies the VLLM_* and HF_* variables to every node):")
        env = " ".join(f"{k}={'***' if k == 'VLLM_API_KEY' else shlex.quote(v)}" for k, v in plan.env.items())
        out.result((env + " " if env else "") + shlex.join(redacted(plan.command)))
        return

    check_access(cfg)
    check_port_free(cfg.host, cfg.port)  # before fetching a model, which can take minutes
    with out.stderr.status("resolving the model") as status:
        progress = lambda msg: (out.log(msg), status.update(msg))  # noqa: E731
        if cfg.replicas is not None:  # engines on this machine, behind Ray Serve's proxy on a Ray llmops starts
            from llmops.serve.replicas import plan_replicas_here

            placed = plan_replicas_here(cfg, progress=progress)
        else:
            plan = plan_server(cfg, ray_address=ray, progress=progress)

    def ready(plan) -> None:
        if json:  # for scripts: the server is ready once this appears on stdout
            out.print_json({"url": plan.url + "/v1", "served_model_name": plan.served_model_name,
                            "adapters": list(plan.adapters), "api_key": plan.api_key is not None})
        else:
            out.result(ready_text(plan))

    if cfg.replicas is not None:
        from llmops.serve.replicas import run_on_ray

        raise typer.Exit(run_on_ray(placed, cfg, log=out.log, on_ready=ready))
    if ray is not None:
        from llmops.serve.replicas import live_nodes, plan_on_ray, run_on_ray, serves_replicas

        if serves_replicas(plan):  # the model fits one node: a replica on each, behind Ray Serve's proxy
            raise typer.Exit(run_on_ray(plan_on_ray(plan, live_nodes(ray), ray, cfg), cfg, log=out.log,
                                        on_ready=ready))
    code = run_server(plan, cfg, log=out.log, waiting=out.stderr.status, on_ready=ready)
    raise typer.Exit(code)


def _show_ray_replicas(plan, cfg: ServeConfig, ray: str, as_json: bool) -> bool:
    """`--dry-run --ray` for a model that fits one node: the Serve application and each replica's vLLM call.
    False for a model served across nodes (its steps are printed as before)."""
    from llmops.serve.replicas import live_nodes, plan_on_ray, serves_replicas

    if not serves_replicas(plan):
        return False
    _show_replicas(plan_on_ray(plan, live_nodes(ray), ray, cfg), as_json)
    return True


def _show_replicas(placed, as_json: bool) -> None:
    """`--dry-run` of replicas (`--replicas` or `--ray`): the Serve application and each replica's vLLM call."""
    if as_json:
        out.print_json(placed.to_dict())
        return
    plan = placed.server
    engine = plan.engine.to_dict()
    notes = engine.pop("notes", ())
    where = "on a Ray instance of this machine" if placed.local else f"on {placed.address}"
    out.key_values(f"serve plan for {', '.join(plan.model_names)} on Ray Serve", [
        ("model path", plan.model_path), *((f"adapter {n}", p) for n, p in plan.adapters.items()),
        ("url", plan.url + "/v1"), ("api key", "required" if plan.api_key else "none"),
        ("ray", f"{where}: application {placed.app_name}, proxy {placed.proxy_location}, "
                f"max_ongoing_requests {placed.ongoing_per_replica} per replica"),
        ("replicas", placed.scaling_text()),
        *engine.items(), *(("why", n) for n in notes)])
    out.key_values("replicas (each runs this vLLM; Serve's proxy forwards to it)",
                   placed.replica_lines())
