"""Rows longer than the context (`llmops batch --on-long truncate|chunk`): a task that wraps the generation
task, so a long document is still one row that runs through the same engine loop (`engine.run_units`).

- **truncate**: the row's document (its prompt, its longest message, or the part of a `--prompt-template`
  its column filled) is cut on token boundaries so the prompt and `max_tokens` fit: its start is kept by
  default (`long.keep=head`), or its end (`tail`), or both ends (`middle`). vLLM's own
  `truncate_prompt_tokens` is not used: it keeps the last tokens of the whole prompt, which cuts a chat
  template's head (the system prompt and the user turn's opening) and can only keep the tail.
- **chunk** (map-reduce): the document is split into pieces that fit, `long.overlap_tokens` apart, cut at
  paragraph, line or sentence edges where there are some; the row's prompt runs on every piece (its first
  round of requests), then the answers are combined with the reduce prompt, as many in one request as fit,
  round after round until one answer is left. Each round is a new set of requests of the same row
  (`RowTask.more`), so pieces and reduce requests of many documents share the engine's batches.

Exactly once per document: a row's result exists only when its last round is done, and the engine loop
commits only rows with a result, so a stop (SIGTERM) commits whole documents only and a kill -9 loses the
documents in flight; the rerun does them again from the start. Keeping finished pieces as state would save
at most one document's map work per row in flight, for a second kind of commit with its own exactly-once
rule; with greedy decoding the rerun gives the same pieces and the same answers anyway.
"""

from __future__ import annotations

import bisect
import re
import statistics
import string
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from llmops.batch.config import LongConfig
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row
from llmops.batch.tasks import Generate, RowTask, _token_ids

# A piece re-tokenized inside its prompt may merge a token or two differently at its edges than it did inside
# the whole document: keep a few tokens of room.
EDGE_TOKENS = 8
# A piece shorter than this is more prompt than document: the row fails with what to change instead.
MIN_PIECE_TOKENS = 32
# Mark left where the middle of a document was cut out (`long.keep=middle`).
CUT_MARK = "\n[...]\n"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
_LINE_OR_SENTENCE = re.compile(r"\n|[.!?][\"')\]]*\s")
_SPACE = re.compile(r"\s")


@dataclass
class _Doc:
    """One long row while its requests run (kept in the engine state by row number)."""

    chunks: int = 1
    rounds: int = 0
    dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rows: list[Row] = field(default_factory=list)
    """The first round: the row itself, its truncated copy, or one copy per piece."""


class LongDocuments(RowTask):
    """`inner` (generation or labeling) on rows of any length, as `config.on_long` says."""

    def __init__(self, inner: Generate, config: LongConfig, template: str | None = None):
        self.inner = inner
        self.config = config
        self.mode = config.on_long or "fail"
        self.name = inner.name
        self.openai_urls = inner.openai_urls
        self.template = template

    def identity(self) -> dict[str, Any]:
        found = {**self.inner.identity(), "on_long": self.mode}
        if self.mode == "truncate":
            found["keep"] = self.config.keep
        elif self.mode == "chunk":
            found.update(overlap_tokens=self.config.overlap_tokens, reduce_prompt=self.config.reduce_prompt)
        return found

    def check(self, row: Row) -> str | None:
        return self.inner.check(row)

    def open(self, llm, job: JobIdentity) -> dict[str, Any]:
        state = self.inner.open(llm, job)
        state.update(window=llm.llm_engine.model_config.max_model_len, docs={})
        return state

    # --- the rounds of a row -------------------------------------------------------------------------

    def requests(self, state, row: Row):
        doc = self.plan(state, row)
        state["docs"][row.index] = doc
        return [request for piece in doc.rows for request in self.inner.requests(state, piece)]

    def more(self, state, row: Row, outputs: list[Any]):
        doc = state["docs"][row.index]
        doc.prompt_tokens += sum(len(o.prompt_token_ids or ()) for o in outputs)
        doc.completion_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        if self.mode != "chunk" or len(outputs) == 1:  # the row's answer: short, truncated, or the last reduce
            return None
        try:
            texts = [o.outputs[0].text.strip() for o in outputs]
            groups = self._groups(state, row, texts)
        except Exception:
            del state["docs"][row.index]
            raise
        doc.rounds += 1
        return [request for group in groups
                for request in self.inner.requests(state, self._reduce_row(state, row, group))]

    def result(self, state, row: Row, outputs: list[Any]) -> dict[str, Any]:
        doc = state["docs"].pop(row.index)
        r = self.inner.result(state, row, outputs)
        if self.mode == "truncate":
            r.update(truncated=doc.dropped > 0, dropped_tokens=doc.dropped)
        elif self.mode == "chunk":  # every request the document took
            r.update(chunks=doc.chunks, reduce_rounds=doc.rounds, prompt_tokens=doc.prompt_tokens,
                     completion_tokens=doc.completion_tokens)
        return {**{k: v for k, v in r.items() if k != "error"}, "error": r["error"]}

    def columns(self, state=None) -> list[tuple[str, Any]]:
        import pyarrow as pa

        columns = self.inner.columns(state)
        extra = {"truncate": [("truncated", pa.bool_()), ("dropped_tokens", pa.int32())],
                 "chunk": [("chunks", pa.int32()), ("reduce_rounds", pa.int32())]}.get(self.mode, [])
        return columns[:-1] + extra + columns[-1:]

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        return self.inner.openai_body(r, model, created)

    # --- splitting ------------------------------------------------------------------------------------

    def max_tokens(self, row: Row) -> int:
        body = row.body or {}
        asked = body.get("max_tokens", body.get("max_completion_tokens"))
        return asked if isinstance(asked, int) and not isinstance(asked, bool) else self.inner.sampling.max_tokens

    def plan(self, state, row: Row) -> _Doc:
        """The row's first round: itself when it fits, else its truncated copy or its pieces. Raises
        ValueError (the row fails alone) when it cannot fit either way."""
        tokenizer, window = state["tokenizer"], state["window"]
        max_tokens = self.max_tokens(row)
        length = len(_token_ids(tokenizer, row))
        if length + max_tokens <= window:
            return _Doc(rows=[row])
        found = document(row, self.template)
        if self.mode == "fail" or found is None:
            raise ValueError(f"the prompt is {length} tokens: with max_tokens {max_tokens} it does not fit the "
                             f"context of {window} tokens" + (" (--on-long truncate or chunk handles it)"
                                                               if self.mode == "fail" else ""))
        text, render = found
        around = len(_token_ids(tokenizer, render("")))
        budget = window - max_tokens - around - EDGE_TOKENS
        if budget < MIN_PIECE_TOKENS:
            raise ValueError(f"the prompt around the document is {around} tokens: with max_tokens {max_tokens} "
                             f"that leaves {max(budget, 0)} of the context's {window} tokens for the document; "
                             "lower --max-tokens or raise engine.max_model_len")
        if self.mode == "chunk":
            self._check_reduce_room(state, row, max_tokens)
        for _ in range(3):  # a piece that came out longer inside its prompt: cut again with less room
            if self.mode == "truncate":
                kept, dropped = cut(text, tokenizer, budget, self.config.keep)
                doc = _Doc(rows=[render(kept)], dropped=dropped)
                row.truncated = True
            else:
                pieces = split(text, tokenizer, budget, self.config.overlap_tokens)
                doc = _Doc(rows=[render(p) for p in pieces], chunks=len(pieces))
            over = max(len(_token_ids(tokenizer, r)) for r in doc.rows) + max_tokens - window
            if over <= 0:
                return doc
            budget -= over + EDGE_TOKENS
        raise ValueError(f"the document could not be cut to fit the context of {window} tokens")

    def _reduce_row(self, state, row: Row, parts: list[str]) -> Row:
        prompt = self.config.reduce_prompt.replace("{parts}", "\n\n".join(parts))
        chat = row.messages is not None or getattr(state["tokenizer"], "chat_template", None)
        return replace(row, prompt=None if chat else prompt, texts=None,
                       messages=[{"role": "user", "content": prompt}] if chat else None)

    def _check_reduce_room(self, state, row: Row, max_tokens: int) -> None:
        room = self._reduce_room(state, row, max_tokens)
        if room < 2 * max_tokens:  # two answers must fit one reduce request, or the rounds never end
            raise ValueError(f"max_tokens {max_tokens} is too large to combine two answers within the context "
                             f"of {state['window']} tokens: lower --max-tokens to at most "
                             f"{max_tokens + (room - 2 * max_tokens) // 3}")

    def _reduce_room(self, state, row: Row, max_tokens: int) -> int:
        around = len(_token_ids(state["tokenizer"], self._reduce_row(state, row, [])))
        return state["window"] - max_tokens - around - EDGE_TOKENS

    def _groups(self, state, row: Row, texts: list[str]) -> list[list[str]]:
        """Consecutive answers, as many to a reduce request as fit (one request when all of them do)."""
        tokenizer = state["tokenizer"]
        room = self._reduce_room(state, row, self.max_tokens(row))
        sizes = [len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts]  # 2: the blank line
        groups: list[list[str]] = []
        used = room + 1
        for text, size in zip(texts, sizes):
            if used + size > room:
                groups.append([])
                used = 0
            groups[-1].append(text)
            used += size
        return groups


def document(row: Row, template: str | None) -> tuple[str, Callable[[str], Row]] | None:
    """The part of a row that is the document, and how to make the row with another text in its place: the
    prompt; or the longest message, less the text a `--prompt-template` put around its column."""
    if row.messages is not None:
        contents = [(i, m["content"]) for i, m in enumerate(row.messages)
                    if isinstance(m, dict) and isinstance(m.get("content"), str)]
        if not contents:
            return None
        at, content = max(contents, key=lambda c: len(c[1]))
        head, tail = _template_literals(template) if template else ("", "")
        start, end = 0, len(content)
        if len(content) >= len(head) + len(tail) and content.startswith(head) and content.endswith(tail):
            start, end = len(head), len(content) - len(tail)

        def render(text: str) -> Row:
            messages = [dict(m) for m in row.messages]
            messages[at]["content"] = content[:start] + text + content[end:]
            return replace(row, messages=messages)

        return content[start:end], render
    if row.prompt is not None:
        return row.prompt, lambda text: replace(row, prompt=text)
    return None


def _template_literals(template: str) -> tuple[str, str]:
    """The template's text before its first field and after its last one."""
    parts = list(string.Formatter().parse(template))
    head = parts[0][0] if parts else template
    tail = parts[-1][0] if parts and parts[-1][1] is None else ""
    return head, tail if len(parts) > 1 else ""


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def split(text: str, tokenizer, budget: int, overlap: int) -> list[str]:
    """`text` in pieces of at most `budget` tokens, each repeating about `overlap` tokens of the one before
    (at most a quarter of a piece), cut at a paragraph, line or sentence edge in its second half if there is
    one."""
    offsets = _offsets(tokenizer, text)
    n = len(offsets)
    overlap = min(overlap, budget // 4)
    starts = [o[0] for o in offsets]
    pieces, s = [], 0
    while True:
        end = min(s + budget, n)
        if end < n:
            end = _edge(text, starts, s + budget // 2, end)
        begin = 0 if s == 0 else starts[s]
        pieces.append(text[begin:starts[end]] if end < n else text[begin:])
        if end >= n:
            return pieces
        s = max(end - overlap, s + 1)
        if overlap:  # start the overlap at a line or sentence start inside it, else at a word
            found = _LINE_OR_SENTENCE.search(text, starts[s], starts[end]) or _SPACE.search(text, starts[s] + 1,
                                                                                             starts[end])
            k = bisect.bisect_left(starts, found.end() - 1) if found else s
            s = k if s < k < end else s


def _edge(text: str, starts: list[int], lo: int, hi: int) -> int:
    """The token in (lo, hi] to cut before: after the last paragraph break, else line break, else sentence
    end in that span; hi if there is none."""
    first, last = starts[lo], starts[hi]
    for found in (text.rfind("\n\n", first, last), text.rfind("\n", first, last)):
        if found > first:
            k = bisect.bisect_left(starts, found)
            if lo < k <= hi:
                return k
    ends = [m.end() - 1 for m in _SENTENCE_END.finditer(text, first, last)]
    if ends:
        k = bisect.bisect_left(starts, ends[-1])
        if lo < k <= hi:
            return k
    return hi


def cut(text: str, tokenizer, budget: int, keep: str) -> tuple[str, int]:
    """`text` cut to `budget` tokens, keeping its head, its tail or both ends; and how many tokens went."""
    offsets = _offsets(tokenizer, text)
    n = len(offsets)
    if n <= budget:
        return text, 0
    if keep == "head":
        return text[:offsets[budget - 1][1]], n - budget
    if keep == "tail":
        return text[offsets[n - budget][0]:], n - budget
    mark = len(tokenizer.encode(CUT_MARK, add_special_tokens=False))
    front = (budget - mark) // 2
    back = budget - mark - front
    return text[:offsets[front - 1][1]] + CUT_MARK + text[offsets[n - back][0]:], n - front - back


# --- the plan and the summary -----------------------------------------------------------------------


def survey(job) -> dict[str, Any] | None:
    """How many rows are too long for the planned context, what happens to them, and about how many engine
    requests the job becomes (a reduce round is estimated with answers of max_tokens each). Reads the input
    and tokenizes it with the model's tokenizer (fast: the engine is not started); None for a model that is
    not local yet or a task that does not generate."""
    from llmops.batch.inputs import iter_units

    task = job.task
    if job.model_path is None or task.name == "embed":
        return None
    long_task = task if isinstance(task, LongDocuments) else LongDocuments(task, LongConfig(on_long="fail"))
    from transformers import AutoTokenizer

    state = {"tokenizer": AutoTokenizer.from_pretrained(str(job.model_path)), "window": job.plan.max_model_len}
    rows = long = failing = requests = 0
    pieces: list[int] = []
    for unit in iter_units(job.input_spec, job.row_counts, job.config.chunk_rows, set(job.unit_sizes), {}):
        for row in unit.rows:
            rows += 1
            if row.error is not None or task.check(row) is not None:
                failing += 1
                continue
            try:
                doc = long_task.plan(state, row)
            except Exception:  # too long and not handled, or a bad row: it fails alone
                failing += 1
                long += 1
                continue
            if doc.rows[0] is not row:
                long += 1
                pieces.append(doc.chunks)
            requests += doc.chunks + _reduce_requests(doc.chunks, long_task, state, row)
    mode = long_task.mode
    return {"rows": rows, "too_long": long, "on_long": mode, "window": state["window"],
            "failing": failing, "requests": requests,
            "pieces_max": max(pieces, default=0), "pieces_median": statistics.median(pieces) if pieces else 0,
            "what_happens": {"fail": "they fail, or the context cuts their answers (--on-long truncate or chunk "
                                     "handles them)", "truncate": f"they are truncated "
                             f"(long.keep={long_task.config.keep})", "chunk": "they are split into pieces and "
                             "map-reduced"}[mode]}


def describe_survey(found: dict[str, Any]) -> str:
    """One line for the plan: how many rows are too long and what happens to them."""
    line = (f"{found['too_long']} of {found['rows']} rows are too long for the context of {found['window']} "
            f"tokens")
    if found["too_long"]:
        line += f": {found['what_happens']}"
        if found["pieces_max"]:
            line += f" ({found['pieces_median']:g} pieces median, {found['pieces_max']} max)"
    return line + f"; about {found['requests']} engine requests"


def _reduce_requests(chunks: int, task: LongDocuments, state, row: Row) -> int:
    if chunks <= 1:
        return 0
    max_tokens = task.max_tokens(row)
    per_request = max(2, task._reduce_room(state, row, max_tokens) // (max_tokens + 2))
    total, left = 0, chunks
    while left > 1:
        left = -(-left // per_request)
        total += left
    return total


def long_summary(out, task: RowTask) -> dict[str, Any] | None:
    """From the committed shards: how many rows were truncated or chunked, and the pieces per chunked
    document (every run's rows, so a resumed job counts them all)."""
    names = [n for n, _ in task.columns(None) if n in ("truncated", "chunks")]
    if not names:
        return None
    truncated, chunks = 0, []
    for shard in out.shards():
        table = out._read_table(shard, names)
        if "truncated" in names:
            truncated += sum(1 for v in table.column("truncated").to_pylist() if v)
        if "chunks" in names:
            chunks += [v for v in table.column("chunks").to_pylist() if v and v > 1]
    found: dict[str, Any] = {"truncated": truncated} if "truncated" in names else {}
    if "chunks" in names:
        found.update(chunked=len(chunks), pieces_max=max(chunks, default=0),
                     pieces_median=statistics.median(chunks) if chunks else 0)
    return found
