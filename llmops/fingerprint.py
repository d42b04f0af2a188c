"""Content fingerprints: what a batch job's identity is made of (its input files and its model's files).

BLAKE2b from the standard library (16-byte digests): about 1 GB/s on one core of this machine's kind
(`scripts/bench_fingerprint.py` measures it), fast enough that an input is hashed again on every run, and
no extra dependency. A model folder is many GB, so `model_digest` caches each file's digest under
`$LLMOPS_HOME/cache/file-digests.json`, keyed by the file's absolute path, size and mtime_ns: a model is
hashed in full once (when it is pulled, exported or registered, or on its first batch run), and later
runs only stat its files. Nothing is written into the model's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable

from llmops.paths import llmops_home

_CHUNK = 1 << 20
_DIGEST_BYTES = 16
# The files that decide a model's output: its config, tokenizer and chat template, and its weights.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".jinja", ".txt",
                       ".tiktoken")
_cache_lock = threading.Lock()


def file_digest(path: str | Path) -> str:
    """The BLAKE2b-128 digest of a file's content, as hex; a URI (`s3://...`) is read through its
    filesystem, so the same bytes give the same digest wherever they are stored."""
    from llmops.storage import is_uri, open_input_stream, reading

    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    with reading(path), (open_input_stream(path) if is_uri(path) else open(path, "rb")) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """One digest over the contents of `paths` (local paths or URIs), in order (names and folders do not
    count, so an input mounted elsewhere, or moved to object storage, is the same input)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for path in paths:
        h.update(bytes.fromhex(file_digest(path)))
    return h.hexdigest()


def model_files(folder: str | Path) -> list[Path]:
    """The files of a model folder that decide its output, sorted by their path inside the folder."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                  and not p.name.startswith("llmops-")  # llmops's own notes (where it came from), not the model
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def model_digest(folder: str | Path) -> str:
    """A digest of a model folder's config, tokenizer and weight files (names inside the folder included,
    since a renamed weight file is another model). Unchanged files are not read again (see the module doc)."""
    root = Path(folder).resolve()
    files = model_files(root)
    if not files:
        raise FileNotFoundError(f"{folder} holds no model files")
    cache = _load_cache()
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    changed = False
    for path in files:
        st = path.stat()
        key = str(path)
        entry = cache.get(key)
        if entry is None or entry[:2] != [st.st_size, st.st_mtime_ns]:
            entry = cache[key] = [st.st_size, st.st_mtime_ns, file_digest(path)]
            changed = True
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(entry[2]))
    if changed:
        _save_cache(cache)
    return h.hexdigest()


def _cache_file() -> Path:
    return llmops_home() / "cache" / "file-digests.json"


def _load_cache() -> dict[str, list]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: it is only a cache
        return {}


def _save_cache(cache: dict[str, list]) -> None:
    """Merge into the cache file through a unique temp file and a rename; a failure only costs a rehash."""
    path = _cache_file()
    with _cache_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**_load_cache(), **cache}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, path)
        except OSError:
            pass
