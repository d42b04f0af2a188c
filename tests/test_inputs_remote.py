"""Batch input from object storage (a local S3-compatible server the tests start) and from Hugging Face
datasets (`save_to_disk` folders, and `load_dataset` on a local dataset folder: the Hub is not reachable)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch.config import InputConfig
from llmops.batch.inputs import InputSpec, check_custom_ids, count_rows, iter_units, open_input, unit_keys
from llmops.errors import StorageError, UsageError
from llmops.storage import filesystem
from tests.conftest import run_cli
from tests.test_storage import bucket, s3_server  # noqa: F401  (fixtures: a moto S3 server and a fresh bucket)

pytestmark = pytest.mark.unit

ROWS = [{"prompt": "Hello", "id": "a", "lang": "en"},
        {"messages": [{"role": "user", "content": "Hi"}], "id": "b"},
        "{not json",
        {"prompt": ""}]
OPENAI = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 3}}
          for i in range(5)]
TABLE = pa.table({"id": [f"r{i}" for i in range(7)], "text": [f"prompt {i}" for i in range(7)],
                  "score": list(range(7))})
CHAT = pa.table({"messages": [[{"role": "user", "content": f"m{i}"}] for i in range(5)], "n": list(range(5))})


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_input(path, kind):
    """One input file of each kind the batch reader knows."""
    if kind == "jsonl":
        write_lines(path, ROWS)
    elif kind == "openai":
        write_lines(path, OPENAI)
    elif kind == "parquet":
        pq.write_table(TABLE, path, row_group_size=3)  # units cross row groups
    else:
        with (pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream)(path, CHAT.schema) as writer:
            for batch in CHAT.to_batches(max_chunksize=2):
                writer.write_batch(batch)


def upload(bucket_name, key, local_path):
    """The local file's exact bytes as an object; returns its URI."""
    fs, path = filesystem(f"s3://{bucket_name}/{key}")
    with fs.open_output_stream(path) as stream:
        stream.write(local_path.read_bytes())
    return f"s3://{bucket_name}/{key}"


def read_all(location, chunk_rows=2, config=InputConfig()):
    spec = open_input(str(location), config)
    counts = count_rows(spec)
    return spec, counts, list(iter_units(spec, counts, chunk_rows, set(unit_keys(counts, chunk_rows))))


def assert_same_units(got, expected):
    assert [u.key for u in got] == [u.key for u in expected]
    for a, b in zip(got, expected):
        assert a.rows == b.rows and a.kept.equals(b.kept)


# --- object storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, name", [("jsonl", "in.jsonl"), ("openai", "requests.jsonl"), ("parquet", "t.parquet"),
                                        ("arrow", "t.arrow"), ("arrows", "t.arrows"), ("parquet", "no-suffix")])
def test_every_format_reads_the_same_from_s3_as_locally(tmp_path, bucket, kind, name):
    local = tmp_path / name
    write_input(local, kind)
    uri = upload(bucket, f"in/{name}", local)
    spec, counts, got = read_all(uri)
    local_spec, local_counts, expected = read_all(local)
    assert spec.files == (uri,) and local_spec.files == (local,)
    assert (spec.format, spec.prompt_column, spec.messages_column, spec.id_column) == \
        (local_spec.format, local_spec.prompt_column, local_spec.messages_column, local_spec.id_column)
    assert counts == local_counts and sum(counts) > 0
    assert_same_units(got, expected)
    # Same bytes, same identity: a job whose input moved from a local disk to the bucket resumes.
    assert spec.identity() == local_spec.identity()
    assert spec.total_bytes() == local_spec.total_bytes() == local.stat().st_size
    assert spec.locations() == [uri] and local_spec.locations() == [str(local.resolve())]
    if kind == "openai":
        assert check_custom_ids(spec) == check_custom_ids(local_spec) == {"m"}


def test_prefixes_and_globs_find_the_shards_a_local_folder_would(tmp_path, bucket):
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    for i, rel in enumerate(["part-0.parquet", "part-1.parquet", "sub/part-2.parquet"]):
        pq.write_table(TABLE.slice(i * 2, 3), folder / rel)
        upload(bucket, f"data/{rel}", folder / rel)
    # Skipped in a folder, as locally: names starting with _ or . (Spark's _SUCCESS, _temporary/), other files.
    (folder / "_SUCCESS").write_bytes(b"")
    upload(bucket, "data/_SUCCESS", folder / "_SUCCESS")
    upload(bucket, "data/_temporary/part-0.parquet", folder / "part-0.parquet")
    upload(bucket, "data/README.md", folder / "_SUCCESS")
    upload(bucket, "data-other/part-9.parquet", folder / "part-0.parquet")  # shares the prefix's name only

    local_spec, _, expected = read_all(folder, chunk_rows=2)
    for prefix in (f"s3://{bucket}/data/", f"s3://{bucket}/data"):
        spec, _, got = read_all(prefix, chunk_rows=2)
        assert spec.files == tuple(f"s3://{bucket}/data/{rel}"
                                   for rel in ["part-0.parquet", "part-1.parquet", "sub/part-2.parquet"])
        assert_same_units(got, expected)
        assert spec.identity() == local_spec.identity()
    assert open_input(f"s3://{bucket}/data/*.parquet", InputConfig()).files == spec.files[:2]
    assert open_input(f"s3://{bucket}/data/part-[01].parquet", InputConfig()).files == spec.files[:2]
    assert open_input(f"s3://{bucket}/data/**/part-?.parquet", InputConfig()).files == \
        (f"s3://{bucket}/data/_temporary/part-0.parquet", *spec.files)  # a glob takes what it names
    # The spec of a job rebuilt from its recorded locations (a worker, a Ray replica) reads the same objects.
    rebuilt = InputSpec(tuple(spec.locations()), spec.format, spec.prompt_column, spec.messages_column,
                        spec.id_column)
    assert rebuilt == spec
    assert InputSpec(tuple(local_spec.locations()), "parquet").files == local_spec.files


def test_missing_objects_buckets_and_endpoints_are_one_line_errors_with_one_exit_code_per_cause(bucket, monkeypatch):
    """Missing objects and buckets are configuration (exit 2); an unreachable store is a runtime failure (exit 1),
    on the input side as on the output side (issue 25: it was 2 here and 1 there, and a missing bucket read
    "input not found")."""
    def error(uri, kind=UsageError):
        with pytest.raises(kind) as info:
            open_input(uri, InputConfig())
        assert type(info.value) is kind
        assert uri.split("*")[0] in info.value.message and "\n" not in info.value.message
        return str(info.value)

    assert "input not found" in error(f"s3://{bucket}/nope.jsonl")
    assert "input not found" in error(f"s3://{bucket}/nope/")
    assert "the bucket does not exist" in error("s3://llmops-no-such-bucket/in.jsonl")
    assert "no files match" in error("s3://llmops-no-such-bucket/data/*.jsonl")
    assert "no files match" in error(f"s3://{bucket}/*.parquet")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert "cannot reach the storage" in error(f"s3://{bucket}/in.jsonl", StorageError)


def test_the_output_side_explains_a_missing_bucket_as_the_input_side_does(bucket):
    """A missing output bucket was exit 1 with raw AWS text and a request id (issue 25)."""
    from llmops.batch.outputs import OutputDir

    with pytest.raises(UsageError, match="cannot write s3://llmops-no-such-bucket/out: the bucket does not exist"):
        OutputDir("s3://llmops-no-such-bucket/out").check(None, False)


def test_an_object_gone_mid_job_is_a_runtime_failure(tmp_path, bucket):
    write_input(tmp_path / "in.jsonl", "jsonl")
    uri = upload(bucket, "in/gone.jsonl", tmp_path / "in.jsonl")
    spec = open_input(uri, InputConfig())
    counts = count_rows(spec)
    fs, path = filesystem(uri)
    fs.delete_file(path)
    with pytest.raises(StorageError, match="input not found: s3://"):  # exit 1: the rerun resumes
        list(iter_units(spec, counts, 2, set(unit_keys(counts, 2))))
    with pytest.raises(UsageError, match="input not found: s3://"):
        spec.identity()


def test_cli_names_a_missing_object_and_exits_2(tmp_path, bucket):
    proc = run_cli("batch", f"s3://{bucket}/missing.jsonl", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"input not found: s3://{bucket}/missing.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- Hugging Face datasets ------------------------------------------------------------------------------


def test_a_save_to_disk_folder_is_read_as_arrow_in_place(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"id": ["a", "b", "c"], "prompt": ["one", "two", ""],
            "messages": [[{"role": "user", "content": "x"}]] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    spec, counts, got = read_all(tmp_path / "saved", config=InputConfig(prompt_column="prompt"))
    assert spec.format == "arrow" and spec.files == (tmp_path / "saved" / "data-00000-of-00001.arrow",)
    assert counts == [3]
    assert [(r.id, r.prompt, r.error) for u in got for r in u.rows] == \
        [("a", "one", None), ("b", "two", None), ("c", None, "empty prompt")]
    assert open_input(str(tmp_path / "saved"), InputConfig()).messages_column == "messages"  # auto, as for Arrow

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["e0"]})})
    splits.save_to_disk(tmp_path / "splits")
    assert [r.prompt for u in read_all(tmp_path / "splits")[2] for r in u.rows] == ["t0", "t1"]
    test = read_all(tmp_path / "splits", config=InputConfig(split="test"))[2]
    assert [r.prompt for u in test for r in u.rows] == ["e0"]
    with pytest.raises(UsageError, match="no split 'dev' \\(splits: train, test\\)"):
        open_input(str(tmp_path / "splits"), InputConfig(split="dev"))
    # Today's reader would have read the folder's .json and .arrow files as a mix of formats.
    assert open_input(str(tmp_path / "splits" / "test"), InputConfig()).files[0].suffix == ".arrow"


@pytest.fixture()
def hub_folder(tmp_path, monkeypatch):
    """A dataset repository as on the Hub (two subsets, parquet files, the README's YAML), cloned locally;
    `load_dataset("acme/quiz")` is pointed at it, recording each call."""
    datasets = pytest.importorskip("datasets")
    repo = tmp_path / "quiz"
    for subset in ("easy", "hard"):
        (repo / subset).mkdir(parents=True)
        for split, n in (("train", 3), ("test", 2)):
            pq.write_table(pa.table({"question": [f"{subset} {split} {i}" for i in range(n)]}),
                           repo / subset / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*.parquet\n"
        f"  - split: test\n    path: {s}/test-*.parquet\n" for s in ("easy", "hard")) + "---\n# Quiz\n")
    calls = []
    real = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real(str(repo) if path == "acme/quiz" else path, name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_uri_loads_the_split_and_subset_asked_for(hub_folder):
    spec, counts, got = read_all("hf://datasets/acme/quiz@v1.0", config=InputConfig(subset="hard", split="test",
                                                                                  prompt_column="question"))
    assert hub_folder == [("acme/quiz", "hard", {"split": "test", "revision": "v1.0"})]
    assert spec.format == "arrow" and counts == [2]
    assert [r.prompt for u in got for r in u.rows] == ["hard test 0", "hard test 1"]
    config = InputConfig(subset="easy", prompt_column="question")
    assert [r.prompt for u in read_all("hf://datasets/acme/quiz", config=config)[2] for r in u.rows] == \
        ["easy train 0", "easy train 1", "easy train 2"]
    assert hub_folder[-1] == ("acme/quiz", "easy", {"split": "train", "revision": None})


@pytest.mark.parametrize("uri, config, message", [
    ("hf://datasets/acme/quiz", InputConfig(subset="easy", split="dev"), "split 'dev'.*Unknown split"),
    ("hf://datasets/acme/quiz", InputConfig(subset="medium"), "subset 'medium'"),
    ("hf://datasets/acme/quiz", InputConfig(subset="easy", split="train[:2]", prompt_column="question"),
     "a selection of the rows"),
    ("hf://datasets/acme/quiz/easy/train.parquet", InputConfig(), "expected hf://datasets/OWNER/NAME"),
    ("hf://datasets/acme/quiz", InputConfig(format="jsonl"), "does not apply"),
])
def test_hf_dataset_errors_are_one_line(hub_folder, uri, config, message):
    with pytest.raises(UsageError, match=message) as info:
        open_input(uri, config)
    assert "\n" not in info.value.message


def test_an_unknown_hub_dataset_offline_says_what_to_do(monkeypatch):
    pytest.importorskip("datasets")
    # conftest sets HF_HUB_OFFLINE=1 before datasets is imported: the Hub is not asked, the call fails at once.
    with pytest.raises(UsageError, match="cannot load the Hugging Face dataset nobody/nothing-here") as info:
        open_input("hf://datasets/nobody/nothing-here", InputConfig())
    assert "not in the local cache" in info.value.hint and "save_to_disk" in info.value.hint


def test_split_and_subset_are_refused_for_other_inputs(tmp_path):
    write_lines(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(UsageError, match="input.split and input.subset apply to Hugging Face datasets"):
        open_input(str(tmp_path / "in.jsonl"), InputConfig(split="test"))


def test_every_listed_key_is_read_as_itself_whatever_its_characters(tmp_path, bucket):
    """A listed key was turned back into a URI and percent-decoded: `f%41.jsonl` read as `fA.jsonl` (its 3 rows
    lost, fA's row twice, exit 0), and a key with a space or `#` refused the whole prefix (issue 25)."""
    fs, root = filesystem(f"s3://{bucket}")
    names = ["a.jsonl", "f%41.jsonl", "fA.jsonl", "sp ace.jsonl", "h#sh.jsonl", "q?x=1.jsonl", "ü+é.jsonl",
             "pct%2F.jsonl"]
    rows = {name: [f"{name}:{n}" for n in range(1 + i % 3)] for i, name in enumerate(names)}
    for name, prompts in rows.items():
        with fs.open_output_stream(f"{root.rstrip('/')}/data/{name}") as stream:  # the raw key, no URI parsing
            stream.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode())
    for location in (f"s3://{bucket}/data/", f"s3://{bucket}/data/*.jsonl"):
        spec, counts, units = read_all(location, chunk_rows=10)
        assert len(spec.files) == len(names), spec.files
        got = [r.prompt for u in units for r in u.rows]
        expected = [p for name in sorted(names) for p in rows[name]]
        assert sorted(got) == sorted(expected) and len(got) == len(set(got))  # every row once, none lost
        assert sorted(spec.identity().files) == sorted(names)  # messages name the keys as they are


def test_a_saved_dataset_refuses_a_split_it_does_not_have_and_an_empty_one_says_so(tmp_path):
    """A wrong input.split on a single saved Dataset was ignored (exit 0, the one split read), and an empty one
    failed with `list index out of range` from datasets (issue 25)."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "one")
    with pytest.raises(UsageError, match="single dataset .*input.split=test cannot choose"):
        open_input(str(tmp_path / "one"), InputConfig(split="test"))
    assert open_input(str(tmp_path / "one"), InputConfig()).prompt_column == "text"  # no split asked: read
    datasets.Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")
    with pytest.raises(UsageError, match="empty dataset: it has no rows"):
        open_input(str(tmp_path / "empty"), InputConfig())
