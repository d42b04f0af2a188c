"""The `llmops serve` config: one pydantic model, loaded from defaults < YAML < `--set` < flags."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from llmops.config import StrictModel
from llmops.vllm_engine import EngineConfig


class ServeConfig(StrictModel):
    """An OpenAI-compatible vLLM server for one model."""

    model: Optional[str] = None
    """Registry alias, local model folder or Hugging Face id; default: the offline default model."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 listens on every interface."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    api_key: Optional[str] = None
    """When set, requests must send `Authorization: Bearer KEY` (else 401). Also read from LLMOPS_API_KEY."""
    allow_unauthenticated: bool = False
    """Serve on a non-loopback host without an API key: anyone who reaches the port can use the model."""
    adapters: list[str] = []
    """Registered LoRA adapters of the model to serve beside it, each under its own name (vLLM's
    --lora-modules). The model may itself be an adapter: its base is then served with it."""
    served_model_name: Optional[str] = None
    """The name clients ask for the base model by; default: its registry alias (or the folder name)."""
    engine: EngineConfig = EngineConfig()
    """How vLLM runs; every "auto" is planned from the hardware and the model."""
    vllm_args: list[str] = []
    """Extra `vllm serve` flags, passed through unchanged (the CLI takes them after `--`)."""
    max_queue: Optional[int] = Field(default=None, ge=0)
    """Requests admitted at once, running or waiting; beyond it a request gets 503 with Retry-After at once.
    Default: planned, the streams the engine runs at once. 0: no limit (vLLM's default, an unbounded queue)."""
    ttft_target_ms: float = Field(default=2000, gt=0)
    """Time to first token to keep for admitted requests: the prompt tokens waiting for prefill are capped at
    what the engine clears in this time, and Retry-After is this long (rounded up to seconds)."""
    grace_period_s: float = Field(default=25, ge=0)
    """On SIGTERM, streams in flight get this long to finish (vLLM's --shutdown-timeout, less a few seconds
    for its teardown) while /ready and new requests answer 503; then vLLM is killed. Under Kubernetes' 30 s."""
    status_every_s: float = Field(default=30, ge=0)
    """While serving, print a status line on stderr this often, when something changed: requests running and
    waiting, KV cache use, and the prefix-cache hit rate since the last line (from vLLM's /metrics). 0: never."""
    store: bool = True
    """Keep conversations for the Responses API (`store`, `previous_response_id`) in a SQLite file under
    state_dir, bounded by conversation_ttl_s and max_stored_responses. False (`--no-store`): keep none, and
    answer a request that asks for `store: true` with an error (vLLM alone ignores it silently)."""
    state_dir: Optional[str] = None
    """Folder of the conversation store; default `$LLMOPS_HOME/conversations`. Created owner-only."""
    state_url: Optional[str] = None
    """A PostgreSQL database for the conversations instead of the SQLite file (`postgresql://USER@HOST:PORT/DB`),
    that servers on several machines share. Its password goes in PGPASSWORD or ~/.pgpass, never in the URL (the
    URL shows in --dry-run). Needs `pip install 'llmops[postgres]'`."""
    conversation_ttl_s: float = Field(default=7 * 24 * 3600, gt=0)
    """A stored response older than this is gone: `previous_response_id` to it gets 404, as an unknown id does."""
    max_stored_responses: int = Field(default=100_000, ge=1)
    """Responses (one per turn, each with its whole history) kept at most; past it the oldest are evicted
    first, counted in /metrics as llmops_conversations_evicted_total."""
    replicas: Union[Literal["auto"], int, None] = None
    """Engines on this machine behind one endpoint (a local Ray Serve application that llmops starts and stops):
    each on its own cores, or its own group of tensor_parallel_size GPUs. `auto`: as many as the machine holds.
    Unset: one vLLM server, no Ray."""
    min_replicas: Optional[int] = Field(default=None, ge=1)
    """With --ray: autoscale between this many replicas and max_replicas on ongoing requests (Ray Serve's
    autoscaling). Unset with max_replicas unset: one replica per live node, fixed."""
    max_replicas: Optional[int] = Field(default=None, ge=1)
    """With --ray: the most replicas (one per node); default: the live nodes. Setting either one autoscales."""
    upscale_delay_s: float = Field(default=30, ge=0)
    """With --ray and autoscaling: how long the load must stay above target before a replica is added."""
    downscale_delay_s: float = Field(default=600, ge=0)
    """With --ray and autoscaling: how long the load must stay below target before a replica is removed."""
    startup_timeout_s: float = Field(default=1800, gt=0)
    """Give up if /health does not answer within this many seconds (large models load slowly)."""
    shutdown_timeout_s: float = Field(default=15, gt=0)
    """Stopping a vLLM that is not serving (it never became ready): wait this long after SIGTERM before killing
    its processes. A serving one gets grace_period_s."""

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_count(cls, value):
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"give a number of engines, 1 or more, or auto (got {value!r})")
        return int(value)

    @field_validator("state_url")
    @classmethod
    def _a_postgres_url_without_password(cls, url: Optional[str]) -> Optional[str]:
        from urllib.parse import urlsplit

        from llmops.serve.conversations import is_url

        if url is None:
            return url
        if not is_url(url):
            raise ValueError(f"{url!r} is not a PostgreSQL URL: give postgresql://USER@HOST:PORT/DB")
        if urlsplit(url).password:  # an empty one (`user:@host`) holds nothing
            raise ValueError("the URL holds a password, which --dry-run and process listings would show: put it "
                             "in PGPASSWORD or ~/.pgpass and leave it out of the URL")
        return url

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas}): "
                             "give a min at most the max")
        return self
