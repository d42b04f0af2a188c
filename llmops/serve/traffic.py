"""What vLLM's OpenAI server lacks under real traffic, as ASGI middleware that `llmops serve` loads into it
(`--middleware llmops.serve.traffic.TrafficMiddleware`). It runs inside vLLM's API server process.

- A `Retry-After` header on every 503. vLLM 0.32's admission control (`--max-num-queued-reqs`,
  `--max-num-queued-tokens`) answers 503 with an OpenAI-shaped body but no Retry-After
  (`QueueOverflowError`/`MaxQueuedTokensError` in vllm/exceptions.py), and clients that honour the header
  (the `openai` client does) would otherwise retry on their own schedule.
- Refusals at the door. vLLM checks its queue limit only after parsing a request, and again after rendering
  its prompt, so in a burst each refusal waits for the parsing of all the others: the slowest of 36 took
  1.27 s on 2 cores. Counting the requests in flight here, a request beyond `--max-num-queued-reqs` is
  refused before anything reads it. vLLM's own checks still apply (a request with n > 1 counts n there).
  vLLM's `vllm:admission_rejections` does not see these: they count in `llmops_refused_requests_total`
  (reason `queue_full` or `draining`) on the same `/metrics`.
- A streamed request refused by admission control gets a 503, not a 200 stream holding the error. vLLM
  checks admission twice: before rendering the prompt (`_preflight`, which can still answer 503) and when it
  adds the request (`AsyncLLM._add_request`), by which time a stream has started with 200. In a burst,
  requests pass the first check together and most refusals come from the second (3 of 8 in a first try):
  the client then sees a 200 whose only event is `{"error": {..., "code": 503}}`. So a stream's 200 is held
  until its first event, which replaces it when it is such an error. Admitted streams lose nothing: their
  first event is their first token.
- `/ready`, for a Kubernetes readiness probe or a load balancer: vLLM's `/health` while serving, 503 once
  `llmops serve` has started to drain.
- While draining, a new request to the API gets 503 with Retry-After; the streams in flight go on. vLLM's
  own drain (`--shutdown-timeout`) refuses new requests too, but by aborting them after they were accepted.

`llmops serve` starts the drain by creating the file named in LLMOPS_DRAIN_FILE: vLLM's launcher owns SIGTERM
in this process (it installs its own handler), and a file is a signal both processes can see. Pure ASGI, no
imports but vLLM's own `prometheus_client`: it must not slow vLLM's start or depend on its web framework.
"""

from __future__ import annotations

import json
import os

RETRY_AFTER_ENV = "LLMOPS_RETRY_AFTER_S"
DRAIN_FILE_ENV = "LLMOPS_DRAIN_FILE"
MAX_QUEUE_ENV = "LLMOPS_MAX_QUEUE"
READY_PATH = "/ready"
BUSY = ("The engine is currently busy and cannot accept new requests. Please try again later or on a different "
        "instance.")  # vLLM's own words (QueueOverflowError)


class TrafficMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.retry_after = os.environ.get(RETRY_AFTER_ENV, "1").encode()
        self.drain_file = os.environ.get(DRAIN_FILE_ENV) or None
        self.max_queue = int(os.environ.get(MAX_QUEUE_ENV) or 0) or None
        self.in_flight = 0  # requests to the API not answered yet; one event loop, so no lock

    def draining(self) -> bool:
        return self.drain_file is not None and os.path.exists(self.drain_file)  # one stat per request

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == READY_PATH:
            if self.draining():
                await self._unavailable(send, "The server is shutting down.")
            else:  # ready is healthy and not draining: vLLM's /health says whether its engine is alive
                await self.app({**scope, "path": "/health", "raw_path": b"/health"}, receive, send)
            return
        work = scope.get("method") == "POST" and path.startswith("/v1/")
        if work and self.draining():
            _count_refusal("draining")
            await self._unavailable(send, "The server is shutting down; send the request to another instance.")
            return
        if work and self.max_queue is not None and self.in_flight >= self.max_queue:
            _count_refusal("queue_full")
            await self._unavailable(send, BUSY)
            return

        held: dict | None = None  # a stream's 200, until its first event says whether it was refused
        refused = False

        async def send_with_retry_after(message) -> None:
            nonlocal held, refused
            if refused:  # the rest of a refused stream ([DONE]); its 503 has been sent
                return
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if message["status"] == 503 and not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", self.retry_after)]}
                elif message["status"] == 200 and any(
                        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                        for name, value in headers):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body = message.get("body", b"")
                if not body and message.get("more_body"):
                    return
                start, held = held, None
                if _refusal(body):
                    refused = True
                    await self._unavailable(send, _refusal(body))
                    return
                await send(start)
            await send(message)

        self.in_flight += work
        try:
            await self.app(scope, receive, send_with_retry_after)
        finally:
            self.in_flight -= work

    async def _unavailable(self, send, message: str) -> None:
        """503 with Retry-After and vLLM's error body."""
        # The body vLLM itself gives a 503 (vllm/entrypoints/serve/exception_handling/error_response.py).
        body = json.dumps({"error": {"message": message, "type": "Service Unavailable", "param": None,
                                     "code": 503}}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after)]})
        await send({"type": "http.response.body", "body": body})


_refused_counter = None


def _count_refusal(reason: str) -> None:
    """Count a refusal on vLLM's /metrics (its default Prometheus registry, with one API server process)."""
    global _refused_counter
    if _refused_counter is None:
        try:
            from prometheus_client import Counter
        except ImportError:  # not inside vLLM (the unit tests): nothing to count on
            return
        _refused_counter = Counter("llmops_refused_requests", "Requests llmops serve refused at once (503).",
                                   ["reason"])
    _refused_counter.labels(reason=reason).inc()


def _refusal(first_event: bytes) -> str | None:
    """The message of a stream's first event when it is vLLM refusing the request with 503, else None."""
    if not first_event.startswith(b"data: {\"error\""):
        return None
    try:
        error = json.loads(first_event[len(b"data: "):].split(b"\n", 1)[0])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return (error.get("message") or "busy") if error.get("code") == 503 else None
