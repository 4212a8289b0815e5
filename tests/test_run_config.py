"""The run config: the issue's minimal YAML runs as written; every bad field is reported with its path."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.config import RunConfig, load_run_config

MINIMAL = """\
model:
  name_or_path: ./tiny-llama        # a local directory or a hub id
  dtype: auto
lora:
  r: 16
  lora_alpha: 32
  lora_dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
data:
  train: data/train.jsonl
  validation: data/val.jsonl
  format: auto
  max_seq_len: 512
train:
  max_steps: 20
  batch_size: 4
  grad_accum: 1
  lr: 2.0e-4
  seed: 0
  eval_every: 10
  save_every: 10
output_dir: runs/demo
"""


@pytest.fixture
def minimal(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL)
    return path


def test_the_minimal_config_loads_as_written(minimal):
    config = load_run_config(minimal)
    assert isinstance(config, RunConfig)
    assert config.model.name_or_path == "./tiny-llama"
    assert config.lora.r == 16 and config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.data.max_seq_len == 512 and config.data.validation == "data/val.jsonl"
    assert (config.train.max_steps, config.train.lr, config.train.save_every) == (20, 2e-4, 10)
    assert config.output_dir == "runs/demo"


def test_overrides_replace_values_and_parse_as_yaml(minimal):
    config = load_run_config(minimal, ["train.lr=1e-3", "lora.target_modules=[q_proj, v_proj]", "train.eval_every=null"])
    assert config.train.lr == 1e-3  # "1e-3" is a string to YAML 1.1; numbers are accepted as written
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.eval_every is None


def test_every_problem_is_reported_together_with_its_path(minimal):
    bad = ["train.lrr=1", "train.batch_size=abc", "lora.r=0", "lora.rr=3", "data.format=json",
           "model.dtype=fp8", "train.max_steps=-1", "output_dir=[1]"]
    with pytest.raises(ConfigError) as caught:
        load_run_config(minimal, bad)
    message = str(caught.value)
    for expected in ["train.lrr: unknown key (did you mean 'lr'?)", "train.batch_size: expected an integer",
                     "lora.r must be a positive integer", "lora.rr: unknown option (did you mean 'r'?)",
                     "data.format: must be one of auto, alpaca, messages, sharegpt, text; got 'json'",
                     "model.dtype: must be one of", "train.max_steps: must be a positive integer, got -1",
                     "output_dir: expected a string"]:
        assert expected in message
    assert "(8 problems)" in message


def test_the_data_section_is_the_data_packages_options(minimal):
    """One schema: the data section is a DataOptions plus where the data is, so its fields, checks and messages are
    those of lorakit.data, reported at load time with the other problems."""
    from dataclasses import fields

    from lorakit.config import DataConfig
    from lorakit.data import DataOptions

    assert [f.name for f in fields(DataConfig)] == [f.name for f in fields(DataOptions)] + [
        "train", "validation", "validation_fraction"]
    config = load_run_config(minimal, ["data.columns={instruction: question}"])
    assert isinstance(config.data, DataOptions)
    assert dict(config.data.columns) == {"instruction": "question"}
    with pytest.raises(ConfigError) as caught:
        load_run_config(minimal, ["data.columns={instrution: q}", "data.max_seq_len=1", "train.lr=0"])
    assert caught.value.problems == [
        "data.columns: unknown key 'instrution' (did you mean 'instruction'?); mappable: instruction, input, output, "
        "system, history, messages, conversations, text, role, content, from, value, tools",
        "data.max_seq_len: expected an integer >= 2, got 1",
        "train.lr: must be a positive number, got 0.0"]


def test_missing_required_fields_say_what_to_give(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert "model.name_or_path: required (a local model directory or a hub id)" in str(caught.value)
    assert "data: required (a section with at least train: path/to/train.jsonl)" in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("model: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of sections"),
])
def test_unreadable_files_are_named(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_run_config(path)


def test_missing_file_and_malformed_override_are_clear(minimal, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_run_config(minimal, ["train.lr"])


def test_six_bad_overrides_are_all_reported_with_the_files_problems(minimal):
    """A malformed override (no '=', bad YAML) does not hide the others, and a type problem in a section does not
    hide a range problem later in the same section: every problem is listed, each with its path."""
    minimal.write_text(MINIMAL.replace("  dtype: auto", "  dtype: fp8"))  # and one problem in the file itself
    bad = ["train.lr=abc",            # bad type
           "train.lrr=1",             # unknown field
           "trian.lr=1",              # unknown section
           "train.batch_size",        # no '='
           "train.epochs=[1",         # not YAML
           "train.warmup_steps=-1"]   # out of range (after train.lr in the section)
    with pytest.raises(ConfigError) as caught:
        load_run_config(minimal, bad)
    message = str(caught.value)
    for expected in ["train.lr: expected a number, got str 'abc'", "train.lrr: unknown key (did you mean 'lr'?)",
                     "trian: unknown key (did you mean 'train'?)",
                     "--set 'train.batch_size': must look like section.field=value",
                     "--set 'train.epochs=[1': the value is not valid YAML",
                     "train.warmup_steps: must be 0 or more, got -1", "model.dtype: must be one of"]:
        assert expected in message
    assert "(7 problems)" in message


@pytest.mark.parametrize("make, expected", [
    (lambda d: d, "is a directory; give the run config's YAML file"),
    (lambda d: d / "missing.yaml", "no such file"),
    (lambda d: _write(d / "bad.yaml", "model: [unclosed\n"), r"bad.yaml:2:1: not valid YAML \(while parsing"),
    (lambda d: _write(d / "latin1.yaml", "model: caf\xe9\n", "latin-1"), "not valid YAML .not UTF-8"),
], ids=["directory", "missing", "bad-yaml", "not-utf8"])
def test_config_file_problems_are_one_line_errors_naming_the_path(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_run_config(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_an_unreadable_config_file_is_a_config_error(tmp_path, monkeypatch):
    """(Simulated: these tests may run as root, who can read a chmod 0 file.)"""
    from pathlib import Path

    path = _write(tmp_path / "run.yaml", MINIMAL)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match="run.yaml: cannot read it .Permission denied.$"):
        load_run_config(path)


def _write(path, text: str, encoding: str = "utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_the_commented_example_config_loads_and_names_every_field():
    """examples/run.yaml documents every field: it loads, and each field of each section appears in it."""
    from dataclasses import fields
    from pathlib import Path

    import lorakit
    from lorakit.config import DataConfig, DistributedConfig, ModelConfig, QuantizationConfig, SpeedConfig, TrainConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "run.yaml"
    load_run_config(path)
    text = path.read_text()
    for cls in (ModelConfig, QuantizationConfig, DataConfig, TrainConfig, SpeedConfig, DistributedConfig,
                lorakit.LoraConfig):
        for f in fields(cls):
            assert f"  {f.name}:" in text, f"{cls.__name__}.{f.name} is not documented in examples/run.yaml"


@pytest.mark.parametrize("override, field", [
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),  # passed `lr > 0` before
    ("train.epochs=1e999", "train.epochs: expected a finite number, got '1e999'"),  # a string to YAML 1.1
    ("train.max_grad_norm=.inf", "train.max_grad_norm: expected a number or null, got float inf"),
    ("lora.lora_alpha=.inf", "lora.lora_alpha must be a positive number, finite and at most 1,000,000, got inf"),
])
def test_non_finite_numbers_are_refused_with_their_path(minimal, override, field):
    """YAML reads .nan and .inf as floats; no field of a run config means anything by them."""
    with pytest.raises(ConfigError) as caught:
        load_run_config(minimal, [override])
    assert field in str(caught.value)
