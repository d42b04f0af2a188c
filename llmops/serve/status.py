"""`llmops serve`'s periodic status line: what vLLM's own `/metrics` says, one line on stderr when it changed.

    llmops serve: 3 running, 1 waiting; KV cache 12.5% used; prefix cache hits 87% of 4,096 prompt tokens

The prefix-cache hit rate is over the prompt tokens since the previous line (vLLM's counters only grow), so a
line says what caching bought lately, not since start-up. The metrics are vLLM 0.32's
(`vllm/v1/metrics/loggers.py`); with several engines (data parallel) the requests and tokens are summed and
the KV cache is the fullest engine's.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"  # a fraction: 1 means the cache is full
# Counters: prometheus_client exposes them with a `_total` suffix. Both count tokens, not requests.
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"


@dataclass(frozen=True)
class Snapshot:
    """One reading of the server's metrics."""

    running: int
    waiting: int
    kv_usage: float
    """The fullest engine's KV cache use, 0 to 1."""
    prefix_queries: int
    """Prompt tokens looked up in the prefix cache since start-up."""
    prefix_hits: int
    """Of those, tokens found there (their KV cache reused, not computed)."""


def parse_metrics(text: str) -> Snapshot:
    """The numbers the status line shows, from Prometheus text (`GET /metrics`)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums = {RUNNING: 0.0, WAITING: 0.0, PREFIX_QUERIES: 0.0, PREFIX_HITS: 0.0}
    kv = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
            elif sample.name == KV_USAGE:
                kv = max(kv, sample.value)
    return Snapshot(int(sums[RUNNING]), int(sums[WAITING]), kv, int(sums[PREFIX_QUERIES]), int(sums[PREFIX_HITS]))


def status_line(previous: Snapshot | None, now: Snapshot) -> str | None:
    """The line for `now`, with the prefix-cache hit rate since `previous`; None when nothing changed (an idle
    server prints nothing)."""
    base = previous or Snapshot(0, 0, 0.0, 0, 0)
    queries = now.prefix_queries - base.prefix_queries
    hits = now.prefix_hits - base.prefix_hits
    if queries < 0:  # the counters went back: vLLM restarted its engine; count from zero
        queries, hits = now.prefix_queries, now.prefix_hits
    if queries == 0 and (now.running, now.waiting, round(now.kv_usage, 3)) == (
            base.running, base.waiting, round(base.kv_usage, 3)):
        return None
    if queries:
        cache = f"prefix cache hits {hits / queries:.0%} of {queries:,} prompt tokens"
    else:
        cache = "no new prompts"
    return (f"llmops serve: {now.running} running, {now.waiting} waiting; KV cache {now.kv_usage:.1%} used; "
            f"{cache}")


def read_metrics(url: str, timeout: float = 3.0) -> Snapshot | None:
    """`URL/metrics` (it needs no API key) parsed, or None when the server does not answer."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as response:
            return parse_metrics(response.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


class StatusLine:
    """Called from the server's run loop: every `every_s` seconds (0: never) reads the metrics and logs a line
    when something changed since the last line (the first: since start-up). A reading blocks the loop for at
    most `read_metrics`' timeout; a server too busy to answer in it is skipped until the next one."""

    def __init__(self, url: str, every_s: float, log, clock) -> None:
        self._url, self._every, self._log, self._clock = url, every_s, log, clock
        self._last: Snapshot | None = None
        self._next = clock() + every_s

    def tick(self) -> None:
        if not self._every or self._clock() < self._next:
            return
        self._next = self._clock() + self._every
        now = read_metrics(self._url)
        if now is None:
            return
        line = status_line(self._last, now)
        if line is not None:
            self._log(line)
            self._last = now
