"""llmops.storage against a local S3-compatible server (moto) that the tests start themselves."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.errors import UsageError
from llmops.storage import exists, filesystem, is_uri, list_files, parquet_bytes, put_once

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def bucket(s3_server, monkeypatch):
    import uuid

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    name = f"llmops-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(name)
    return name


def test_commit_is_one_put_and_the_first_writer_wins(bucket):
    fs, folder = filesystem(f"s3://{bucket}/out/results")
    shard = f"{folder}/part-00000-000000.parquet"
    first = pa.table({"row": [0, 1], "generated_text": ["a", "b"]})
    assert put_once(fs, shard, parquet_bytes(first))
    assert not put_once(fs, shard, parquet_bytes(pa.table({"row": [0, 1], "generated_text": ["x", "y"]})))
    assert pq.read_table(shard, filesystem=fs).equals(first)  # a retried or zombie writer changed nothing
    assert list_files(fs, folder, ".parquet") == [shard]
    assert list_files(fs, f"{folder}-missing", ".parquet") == []


def test_a_writer_that_fails_before_its_put_leaves_nothing(bucket):
    fs, folder = filesystem(f"s3://{bucket}/out/results")
    shard = f"{folder}/part-00000-000001.parquet"

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("the engine died while serializing")

    with pytest.raises(Exception):
        put_once(fs, shard, parquet_bytes(Broken()))
    assert not exists(fs, shard)


def test_parquet_input_reads_from_the_bucket(bucket):
    fs, path = filesystem(f"s3://{bucket}/in/prompts.parquet")
    table = pa.table({"id": ["a", "b"], "prompt": ["hi", "there"]})
    assert put_once(fs, path, parquet_bytes(table))
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_local_paths_and_bad_uris(tmp_path):
    assert not is_uri(str(tmp_path)) and is_uri("s3://b/k") and is_uri("gs://b/k")
    fs, path = filesystem(tmp_path / "x.bin")
    assert put_once(fs, path, b"one") and not put_once(fs, path, b"two")
    assert (tmp_path / "x.bin").read_bytes() == b"one"
    assert not list((tmp_path).glob("*.tmp"))
    with pytest.raises(UsageError, match="cannot open hdfs://"):
        filesystem("hdfs://nowhere:1/x")
