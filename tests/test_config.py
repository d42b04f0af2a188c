import pytest
from pydantic import Field

from llmops.config import StrictModel, load_config, parse_sets
from llmops.errors import ConfigError, UsageError

pytestmark = pytest.mark.unit


class Sampling(StrictModel):
    temperature: float = 1.0
    max_tokens: int = Field(default=16, ge=1)


class Job(StrictModel):
    name: str
    learning_rate: float = 1e-4
    sampling: Sampling = Sampling()


def test_precedence_defaults_yaml_sets_flags(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: from-yaml\nlearning_rate: 0.5\nsampling: {temperature: 0.2, max_tokens: 8}\n")
    job = load_config(Job, yaml_path=path, sets=["sampling.max_tokens=32", "learning_rate=0.25"],
                      flags={"sampling.temperature": 0.9, "name": None})
    assert job.name == "from-yaml"  # a flag left at None does not override
    assert job.learning_rate == 0.25  # --set beats YAML
    assert job.sampling.max_tokens == 32
    assert job.sampling.temperature == 0.9  # a typed flag beats everything


def test_every_problem_is_listed_with_did_you_mean(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learning_rat: 1\nsampling: {max_tokens: 0, temprature: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, yaml_path=path)
    problems = dict(err.value.problems)
    assert problems["name"] == "required, but not given"
    assert "did you mean `learning_rate`" in problems["learning_rat"]
    assert "did you mean `sampling.temperature`" in problems["sampling.temprature"]
    assert "greater than or equal to 1" in problems["sampling.max_tokens"]
    assert err.value.exit_code == 2
    assert str(path) in str(err.value)


def test_bad_set_and_bad_yaml_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not key=value"):
        parse_sets(["novalue"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(Job, yaml_path=bad)
    with pytest.raises(UsageError, match="not found"):
        load_config(Job, yaml_path=tmp_path / "missing.yaml")


def test_set_values_are_parsed_as_yaml():
    assert parse_sets(["a.b=1", "a.c=true", "d=[1, 2]", "e=text", "f="]) == {
        "a": {"b": 1, "c": True}, "d": [1, 2], "e": "text", "f": ""}
