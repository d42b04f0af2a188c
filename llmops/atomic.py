"""Writing a file so that readers and crashes see the old content or the new, never half: one function for the
batch shards and manifest, the registry, and training's run records."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_atomic(path: Path, write, *, replace: bool = True) -> bool:
    """Write through `write(file)` to a unique temp file, fsync, and put it at `path`; fsync the folder.

    `replace=False` is first-writer-wins: if `path` exists, the temp file is dropped and False returned.
    The temp file never outlives a failure (a full disk leaves nothing behind)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if a shard is already there
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # pyarrow's writer does not say which file
            raise OSError(e.errno, e.strerror or str(e), str(path.parent)) from e
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
