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

from pathlib import Path

from llmops.errors import UsageError

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
