"""Storage every node can reach: local paths and URIs (`s3://`, `gs://`, `hdfs://`, `file://`) through
pyarrow's filesystems, with the one write a batch commit needs.

A commit on an object store is one PUT of the finished shard: the shard is serialized in memory first,
so an object under its final name is always complete (a writer that dies mid-way leaves nothing). There is
no atomic "create if absent" in pyarrow's S3 client, so first-writer-wins is a check before the PUT: two
writers racing on the same unit can both PUT, and the later one replaces the earlier with an equally
complete shard of the same rows. A reader never sees a torn shard, and never a row twice.

S3-compatible servers (MinIO, a test server) are reached with AWS_ENDPOINT_URL, as in the AWS CLI; the
credentials come from the usual AWS variables or files.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote

from llmops.errors import LlmopsError, UsageError

URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(URI_SCHEMES)


def filesystem(location: str | Path):
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot open {location}: {str(e).splitlines()[0]}; check the URI, and for an "
                         "S3-compatible server set AWS_ENDPOINT_URL") from None


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def put_once(fs, path: str, data: bytes) -> bool:
    """Write `data` at `path` unless something is there already (first writer wins); False if it was.
    One PUT on an object store; a local file goes through a unique temp name and a link."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        from llmops.atomic import write_atomic

        return write_atomic(Path(path), lambda f: f.write(data), replace=False)
    if exists(fs, path):
        return False
    with fs.open_output_stream(path) as stream:  # the upload completes on close, as one object
        stream.write(data)
    return True


def parquet_bytes(table) -> bytes:
    """A table as a complete Parquet file in memory (what one PUT uploads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def list_files(fs, folder: str, suffix: str = "") -> list[str]:
    """Paths of the files directly in `folder` ending with `suffix`, sorted; none when it does not exist."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


# --- reading (batch input) ------------------------------------------------------------------------------
# Readers take the full URI of each object (what `llmops batch` records as the input's locations), so a
# remote object can be opened on any node from its name alone.

_GLOB_CHARS = "*?["
# Read buffer for objects read front to back (JSONL lines, Arrow IPC streams, digests): few large GETs
# instead of one request per line or per record batch.
_STREAM_BUFFER = 8 << 20


def base_name(location: str | Path) -> str:
    """The last part of a path or URI (`s3://b/in/x.jsonl?region=r` -> `x.jsonl`), for messages."""
    if not is_uri(location):
        return Path(location).name
    return unquote(_split_query(str(location))[0].rstrip("/").rsplit("/", 1)[-1])


def parent(location: str | Path) -> str:
    """The folder (or prefix) holding `location`, ending with '/', for messages."""
    if not is_uri(location):
        return f"{Path(location).parent}/"
    return _split_query(str(location))[0].rsplit("/", 1)[0] + "/"


def _split_query(uri: str) -> tuple[str, str]:
    """(the URI without its query, the query): `s3://b/k?region=r` -> ("s3://b/k", "region=r"). A `?` that
    no key=value follows is a glob's (`s3://b/part-?.parquet`)."""
    at = uri.find("?")
    while at >= 0:
        query = uri[at + 1:]
        if "=" in query and "/" not in query:
            return uri[:at], query
        at = uri.find("?", at + 1)
    return uri, ""


def open_input_stream(uri: str):
    """A buffered binary reader over an object, read front to back; iterating it gives lines. The bytes
    are the object's as stored (no decompression by extension), so a digest matches the local file's."""
    import io

    fs, path = filesystem(uri)
    return io.BufferedReader(fs.open_input_stream(path, compression=None, buffer_size=_STREAM_BUFFER))


def open_input_file(uri: str):
    """A random-access pyarrow file over an object (Parquet footers and row groups, Arrow IPC files)."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def file_size(uri: str) -> int | None:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).size


def find_objects(uri: str) -> tuple[str, list[str]]:
    """What `uri` names: ("file", [uri]), ("folder", [every object under it, sorted]), ("glob", [the
    objects matching it, sorted]) or ("missing", []). A folder's objects whose path inside it has a part
    starting with `_` or `.` are left out, as pyarrow.dataset and Spark do (`_SUCCESS`, `_temporary/`). A
    glob's `*` and `?` stay within one path part, `**` crosses parts, as in the shell and Python's glob."""
    import pyarrow.fs as pafs

    base, query = _split_query(uri)
    glob_at = min((base.find(c) for c in _GLOB_CHARS if c in base), default=-1)
    folder = base if glob_at < 0 else base[:base.rfind("/", 0, glob_at)]
    fs, folder_path = filesystem(folder + (f"?{query}" if query else ""))
    # The URI of an object from its path inside the filesystem: s3://b/k <-> "b/k", hdfs://h:1/p <-> "/p".
    prefix = folder.rstrip("/")[:len(folder.rstrip("/")) - len(folder_path.rstrip("/"))]

    def to_uri(path: str) -> str:
        # Keys are bytes, not URI text: pyarrow percent-decodes a URI's path when it opens it, so a listed key
        # is quoted to come back as itself (`f%41.jsonl` was read as `fA.jsonl`; `#` and spaces did not parse).
        return prefix + quote(path, safe="/") + (f"?{query}" if query else "")

    if glob_at < 0:
        kind = fs.get_file_info(folder_path).type
        if kind == pafs.FileType.File:
            return "file", [uri]
        if kind == pafs.FileType.NotFound:
            return "missing", []
    recursive = glob_at < 0 or "**" in base or "/" in base[glob_at:]
    infos = fs.get_file_info(pafs.FileSelector(folder_path, recursive=recursive, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if glob_at < 0:
        inside = len(folder_path.rstrip("/")) + 1
        return "folder", [to_uri(p) for p in paths
                          if not any(part.startswith(("_", ".")) for part in p[inside:].split("/"))]
    pattern = _glob_regex(folder_path.rstrip("/") + base[len(folder.rstrip("/")):])
    return "glob", [to_uri(p) for p in paths if pattern.fullmatch(p)]


def _glob_regex(pattern: str):
    import re

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            inner = pattern[i + 1:end]
            out.append("[" + ("^" + inner[1:] if inner.startswith("!") else inner) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def storage_error(uri: str, error: OSError, action: str = "read",
                  not_found: type[LlmopsError] = UsageError) -> LlmopsError:
    """The one explanation of an object-store error, for input and output alike: one line naming the location
    and what to do (pyarrow's text names the S3 call, an error code and a request id), and one exit code per
    cause. A missing bucket, refused credentials or a malformed URI are configuration: exit 2, which a job
    scheduler should not retry. An unreachable store and anything else are runtime failures: exit 1, and a
    rerun resumes. A missing object is `not_found` (exit 2 when the job is planned; exit 1 when an object
    vanishes mid-job)."""
    from llmops.errors import StorageError

    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.split(" (Request ID", 1)[0].split("; Details:", 1)[0]
    text = text[text.find("AWS Error"):] if "AWS Error" in text else text  # not "When getting info for key..."
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return missing_error(uri, action, not_found, bucket_missing=True)
    if any(word in upper for word in ("ACCESS_DENIED", "ACCESSDENIED", "FORBIDDEN", "CREDENTIALS",
                                      "INVALID_ACCESS_KEY", "SIGNATURE", "HTTP STATUS 403")):
        return UsageError(f"not allowed to {action} {uri}: {text}", f"set credentials that may {action} it "
                          "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                          "GOOGLE_APPLICATION_CREDENTIALS for gs://)")
    if "NETWORK_CONNECTION" in upper or "COULD NOT CONNECT" in upper or "TIMEOUT" in upper:
        return StorageError(f"cannot reach the storage of {uri}: {text}", "check the network; for an "
                            "S3-compatible server (MinIO, Ceph) set AWS_ENDPOINT_URL to its address")
    if isinstance(error, FileNotFoundError) or "NO_SUCH_KEY" in upper:
        return missing_error(uri, action, not_found)
    return StorageError(f"cannot {action} {uri}: {text}", "check the URI and the credentials; for an "
                        "S3-compatible server set AWS_ENDPOINT_URL")


def missing_error(uri: str, action: str = "read", not_found: type[LlmopsError] = UsageError,
                  bucket_missing: bool | None = None) -> LlmopsError:
    """What a missing object or bucket is: a missing bucket is always configuration (exit 2); a missing object
    is `not_found`."""
    if bucket_missing or (bucket_missing is None and bucket_missing_of(uri)):
        return UsageError(f"cannot {action} {uri}: the bucket does not exist", "check the bucket's name, and "
                          "AWS_ENDPOINT_URL if the bucket is on an S3-compatible server")
    return not_found(f"input not found: {uri}" if action == "read" else f"cannot {action} {uri}: not found",
                     "check the bucket and the key; a folder of shards is a prefix (s3://bucket/data/), several "
                     "files a glob (s3://bucket/data/*.parquet)")


def bucket_missing_of(uri: str) -> bool:
    """Whether the bucket of `uri` is missing (S3 answers a HEAD of a key in a missing bucket with a plain 404,
    which read as "input not found")."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        return fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except Exception:  # cannot tell: say what the store said
        return False


@contextmanager
def reading(location: str | Path, error_type: type[LlmopsError] = UsageError):
    """Turn a storage error on a URI into a one-line `storage_error`; errors on a local path pass through
    unchanged (their callers already say what they mean)."""
    try:
        yield
    except OSError as e:
        if not is_uri(location):
            raise
        raise storage_error(str(location), e, "read", error_type) from None
