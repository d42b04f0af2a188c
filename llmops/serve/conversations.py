"""The conversations `llmops serve` keeps for OpenAI's Responses API (`store`, `previous_response_id`).

vLLM keeps them in two Python dicts of its `OpenAIServingResponses` (`response_store`: the response objects,
`msg_store`: each response's whole message history), when VLLM_ENABLE_RESPONSES_API_STORE=1: never removed
(its own source says so), lost on every restart, and seen by one process only. `vllm_entry` swaps both dicts
for the two mappings here, over one SQLite file:
- persistent: every write is a transaction in a WAL-mode database under `$LLMOPS_HOME/conversations`
  (`--state-dir`), created owner-only (conversations are user data);
- bounded: a response older than the TTL is gone (`previous_response_id` to it answers 404, as an unknown id
  does), and beyond `max_responses` the oldest are evicted first; evictions are counted in the file, and
  `/metrics` shows the count (`llmops_conversations_evicted_total`);
- inspectable: `llmops conversations list|rm|prune` reads and edits the same file;
- shareable: `--state-url postgresql://HOST/DB` keeps the same table in PostgreSQL instead, for servers (or
  Ray Serve replicas) on several machines: a conversation started on one continues on another.

Each row holds one response and the whole history that led to it, so evicting an old turn never breaks a
newer one. Tested with vLLM 0.32 (`vllm/entrypoints/openai/responses/serving.py`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_MAX_RESPONSES = 100_000
FILE = "conversations.sqlite3"
ENV = "LLMOPS_CONVERSATIONS"
# How long a write waits for another process's (SQLite's busy timeout).
SQLITE_BUSY_S = 30.0
"""How `llmops serve` tells its vLLM process where the store is (JSON: path, ttl_s, max_responses), or `off`."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    response TEXT,
    messages TEXT
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# The same tables in PostgreSQL; `seq` orders responses created in the same instant, as SQLite's rowid does.
_PG_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS llmops_responses (id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, "
    "response TEXT, messages TEXT, seq BIGSERIAL)",
    "CREATE INDEX IF NOT EXISTS llmops_responses_created ON llmops_responses (created)",
    "CREATE TABLE IF NOT EXISTS llmops_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
]


def is_url(location: str | Path) -> bool:
    """A PostgreSQL URL (`--state-url`), as opposed to a path to the SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def default_state_dir() -> Path:
    from llmops.paths import llmops_home

    return llmops_home() / "conversations"


@dataclass(frozen=True)
class Stored:
    id: str
    created: float
    bytes: int
    turns: int


class ConversationStore:
    """Responses and their histories, bounded by age and count: one SQLite file (a path), or a PostgreSQL
    database (a `postgresql://` URL) that servers on several machines share. Safe to share between the
    threads of one process, and between processes (SQLite's locking, or PostgreSQL's)."""

    def __init__(self, location: Path | str, *, ttl_s: float = DEFAULT_TTL_S,
                 max_responses: int = DEFAULT_MAX_RESPONSES, clock: Callable[[], float] = time.time):
        self.ttl_s, self.max_responses, self.clock = ttl_s, max_responses, clock
        self._lock = threading.Lock()
        if is_url(location):
            self.location, self._pg = str(location), True
            self._db = _connect_postgres(self.location)
            self._responses, self._counters = "llmops_responses", "llmops_counters"
        else:
            self.location, self._pg = Path(location), False
            self.location.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.location, os.O_CREAT | os.O_RDWR, 0o600))  # owner-only before SQLite writes
            os.chmod(self.location, 0o600)
            self._db = sqlite3.connect(self.location, timeout=SQLITE_BUSY_S, isolation_level=None,
                                       check_same_thread=False)
            _set_up_sqlite(self._db)
            self._responses, self._counters = "responses", "counters"

    def close(self) -> None:
        self._db.close()

    def _sql(self, statement: str, params: tuple = ()):
        """Run one statement written for SQLite (`?` placeholders, the SQLite table names) on either database."""
        statement = statement.replace("responses", self._responses).replace("counters", self._counters)
        if self._pg:
            statement = statement.replace("?", "%s").replace("LIMIT -1 OFFSET", "OFFSET").replace("rowid", "seq")
        return self._db.execute(statement, params)

    def _do(self, work: Callable[[], Any], write: bool = False) -> Any:
        """`work` under the lock (in one write transaction that takes the database's write lock at once, for
        `write`). A PostgreSQL connection the server dropped (a restart, a failover) is opened again and
        `work` run once more: every operation here is idempotent."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if not write:
                        return work()
                    with _PostgresTransaction(self._db) if self._pg else _SqliteTransaction(self._db):
                        return work()
                except Exception:
                    if not (self._pg and attempt == 1 and self._db.broken):
                        raise
                    self._db.close()
                    self._db = _connect_postgres(self.location)

    # --- what vLLM reads and writes ------------------------------------------------------------------

    def get(self, column: str, key: str) -> str | None:
        """The stored text of `column` ("response" or "messages") for `key`; None when unknown or expired."""
        row = self._do(lambda: self._sql(f"SELECT {_column(column)} FROM responses WHERE id = ? AND created >= ?",
                                         (key, self.clock() - self.ttl_s)).fetchone())
        return None if row is None else row[0]

    def put(self, column: str, key: str, text: str) -> None:
        """Store `text` in `column` of `key` (its row is created on first write), then evict what is past the
        bounds, in one transaction."""
        now = self.clock()

        def write() -> None:
            self._sql(f"INSERT INTO responses (id, created, {_column(column)}) VALUES (?, ?, ?) "
                      f"ON CONFLICT (id) DO UPDATE SET {column} = excluded.{column}", (key, now, text))
            self._evict(now)

        self._do(write, write=True)

    def _evict(self, now: float) -> int:
        expired = self._sql("DELETE FROM responses WHERE created < ?", (now - self.ttl_s,)).rowcount
        over = self._sql("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created DESC, "
                         "rowid DESC LIMIT -1 OFFSET ?)", (self.max_responses,)).rowcount
        if over:
            self._sql("INSERT INTO counters (name, value) VALUES ('evicted', ?) ON CONFLICT (name) DO "
                      "UPDATE SET value = counters.value + excluded.value", (over,))
        return expired + over

    # --- what people read and edit -------------------------------------------------------------------

    def evicted_total(self) -> int:
        row = self._do(lambda: self._sql("SELECT value FROM counters WHERE name = 'evicted'").fetchone())
        return row[0] if row else 0

    def count(self) -> int:
        return self._do(lambda: self._sql("SELECT COUNT(*) FROM responses WHERE created >= ?",
                                          (self.clock() - self.ttl_s,)).fetchone()[0])

    def list(self) -> list[Stored]:
        """The stored responses, newest first."""
        rows = self._do(lambda: self._sql(
            "SELECT id, created, LENGTH(COALESCE(response, '')) + LENGTH(COALESCE(messages, '')), messages "
            "FROM responses WHERE created >= ? ORDER BY created DESC", (self.clock() - self.ttl_s,)).fetchall())
        return [Stored(i, c, n, len(json.loads(m)) if m else 0) for i, c, n, m in rows]

    def remove(self, key: str) -> bool:
        return self._do(lambda: self._sql("DELETE FROM responses WHERE id = ?", (key,)).rowcount > 0)

    def prune(self) -> int:
        """Remove what is past the bounds now (the server also does on every write); how many were removed."""
        return self._do(lambda: self._evict(self.clock()), write=True)


def _set_up_sqlite(db) -> None:
    """WAL mode and the tables. Servers that open a new file at once (`--replicas` share one) race to switch
    it to WAL, and SQLite answers the losers "database is locked" at once, without waiting out its busy
    timeout (4% of 6 stores opened together): try again until that timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _SqliteTransaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *_):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


class _PostgresTransaction:
    """Writers take one advisory lock, so that two servers evicting at once count each eviction once."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.tx = self.db.transaction()
        self.tx.__enter__()
        self.db.execute("SELECT pg_advisory_xact_lock(7263551)")  # any fixed number: llmops's writers

    def __exit__(self, *exc):
        return self.tx.__exit__(*exc)


def _connect_postgres(url: str):
    from llmops.errors import UsageError

    try:
        import psycopg
    except ImportError as e:
        raise UsageError(f"a PostgreSQL conversation store needs psycopg ({e})",
                         "pip install 'llmops[postgres]'") from e
    try:
        db = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise UsageError(f"cannot reach the conversation store at {redact_url(url)}: {str(e).strip()}",
                         "check --state-url (postgresql://USER@HOST:PORT/DB; the password in PGPASSWORD or "
                         "~/.pgpass) and that the server accepts connections from here") from e
    for statement in _PG_SCHEMA:
        db.execute(statement)
    return db


def redact_url(url: str) -> str:
    """`url` without the password it may hold."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _column(name: str) -> str:
    if name not in ("response", "messages"):
        raise ValueError(f"no column {name!r}")
    return name


class StoreColumn(MutableMapping):
    """One column of the store as the dict vLLM expects (`get`, `[key]`, `[key] = value`)."""

    def __init__(self, store: ConversationStore, column: str, encode: Callable[[Any], str],
                 decode: Callable[[str], Any]):
        self.store, self.column, self.encode, self.decode = store, column, encode, decode

    def __getitem__(self, key: str) -> Any:
        text = self.store.get(self.column, key)
        if text is None:
            raise KeyError(key)
        return self.decode(text)

    def __setitem__(self, key: str, value: Any) -> None:
        self.store.put(self.column, key, self.encode(value))

    def __delitem__(self, key: str) -> None:
        if not self.store.remove(key):
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([s.id for s in self.store.list()])

    def __len__(self) -> int:
        return self.store.count()


def _jsonable(value: Any) -> Any:
    """A message part that is a pydantic object (vLLM puts some in the history) as plain JSON data."""
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_none=True)
    raise TypeError(f"cannot store a {type(value).__name__} in a conversation")


def response_column(store: ConversationStore) -> StoreColumn:
    from vllm.entrypoints.openai.responses.protocol import ResponsesResponse

    return StoreColumn(store, "response", lambda r: r.model_dump_json(), ResponsesResponse.model_validate_json)


def messages_column(store: ConversationStore) -> StoreColumn:
    return StoreColumn(store, "messages", lambda m: json.dumps(m, default=_jsonable), json.loads)


def setting(state_dir: Path | None, ttl_s: float, max_responses: int, enabled: bool,
            state_url: str | None = None) -> str:
    """The value of LLMOPS_CONVERSATIONS for a server."""
    if not enabled:
        return "off"
    where = {"url": state_url} if state_url else {"path": str(Path(state_dir or default_state_dir()) / FILE)}
    return json.dumps({**where, "ttl_s": ttl_s, "max_responses": max_responses})


def install(value: str) -> None:
    """In vLLM's API server process: swap the Responses server's dicts for the store (or, with `off`, refuse
    an explicit `store: true` instead of ignoring it, vLLM's default)."""
    from http import HTTPStatus

    from vllm.entrypoints.openai.responses import serving

    cls = serving.OpenAIServingResponses
    if getattr(cls, "_llmops_conversations", None) is not None:
        return
    if value == "off":
        validate = cls._validate_create_responses_input

        def refuse_store(self, request):
            if request.store and "store" in request.model_fields_set:
                return self.create_error_response(
                    err_type="invalid_request_error", status_code=HTTPStatus.BAD_REQUEST, param="store",
                    message="this server keeps no conversations (llmops serve --no-store): send store=false and "
                            "the whole conversation with each request")
            return validate(self, request)

        cls._validate_create_responses_input = refuse_store
        cls._llmops_conversations = "off"
        return
    settings = json.loads(value)
    opened: list[ConversationStore] = []  # opened by the process that serves (not vLLM's engine processes)
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not opened:
            where = settings.get("url") or Path(settings["path"])
            opened.append(ConversationStore(where, ttl_s=float(settings["ttl_s"]),
                                            max_responses=int(settings["max_responses"])))
            _expose_metrics(opened[0])
        self.enable_store = True  # `store` is honoured (vLLM's default ignores it), in the file
        self.response_store = response_column(opened[0])
        self.msg_store = messages_column(opened[0])

    cls.__init__ = __init__
    cls._llmops_conversations = settings
    _add_input_items_route(opened)


def input_items(messages: list[dict], response_id: str) -> list[dict]:
    """A stored history as OpenAI's input items (`GET /v1/responses/{id}/input_items`), oldest first."""
    items = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            continue  # tool calls and their outputs: not shown
        content = message.get("content")
        if isinstance(content, list):  # parts: keep their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        part = {"type": "output_text", "text": content or "", "annotations": []} if role == "assistant" else \
            {"type": "input_text", "text": content or ""}
        items.append({"type": "message", "id": f"msg_{response_id[5:]}_{i}", "role": role, "status": "completed",
                      "content": [part]})
    return items


def _add_input_items_route(opened: list[ConversationStore]) -> None:
    """vLLM 0.32 has no `GET /v1/responses/{id}/input_items`; `llmops chat --resume` reads a conversation
    with it. On vLLM's own Responses router, so its API key check applies."""
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.openai.responses.api_router import router

    # No annotations FastAPI would have to resolve beyond builtins (this module postpones them).
    @router.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, order: str = "desc"):
        text = opened[0].get("messages", response_id) if opened else None
        if text is None:
            return JSONResponse(status_code=404, content={"error": {
                "message": f"Response with id '{response_id}' not found.", "type": "invalid_request_error",
                "param": "response_id", "code": 404}})
        items = input_items(json.loads(text), response_id)
        if order != "asc":
            items.reverse()
        return JSONResponse({"object": "list", "data": items, "has_more": False,
                             "first_id": items[0]["id"] if items else None,
                             "last_id": items[-1]["id"] if items else None})


def _expose_metrics(store: ConversationStore) -> None:
    """`/metrics` (vLLM serves prometheus_client's default registry): the evictions and what is stored."""
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            yield CounterMetricFamily("llmops_conversations_evicted", "Responses evicted past the store's size cap",
                                      value=store.evicted_total())
            yield GaugeMetricFamily("llmops_conversations_stored", "Responses stored (within the TTL)",
                                    value=store.count())

    REGISTRY.register(Collector())
