"""The run config: one YAML file describes a run (model, adapter, data, training, output).

Typed dataclasses, validated once at the edge: every problem (unknown key, wrong type, missing
required field, value out of range) is collected and reported together with the field's dotted path
and what is expected, before any model loads. `--set train.lr=2e-4` style overrides are applied to
the raw mapping first, so they are validated exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .data.options import DataOptions
from .errors import ConfigError
from .lora.config import LoraConfig
from .serving_compat import TARGETS as DEPLOY_TARGETS


@dataclass(kw_only=True)
class QuantizationConfig:
    bits: Literal[4, 8]
    """4: QLoRA's 4-bit base (about 0.5 bytes per weight); 8: LLM.int8 (about 1 byte per weight). Needs
    bitsandbytes: pip install 'lorakit[quant]'."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 (normal float) is what QLoRA recommends."""
    double_quant: bool = True
    """4-bit: quantize the per-block scales as well (saves about 0.4 bits per weight)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the 4-bit weights are dequantized to for each matmul; auto: the same as model.dtype."""


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str
    """A local directory or a Hugging Face hub id (e.g. "Qwen/Qwen2.5-0.5B")."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype of the frozen base. auto: bfloat16 on GPUs and on CPUs with bf16 matrix units
    (AMX / AVX-512-BF16), float32 elsewhere. Trainable LoRA weights follow adapter_dtype."""
    quantization: QuantizationConfig | None = None
    """Load the base in 4 or 8 bits, e.g. {bits: 4, type: nf4, double_quant: true}; null: not quantized.
    The checkpoint is quantized tensor by tensor as it is read, never held whole in 16 bits."""
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trainable LoRA weights (and so of their optimizer state). float32 keeps small updates
    from rounding away; bfloat16 halves their memory."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto picks CUDA, then MPS, then the CPU."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off unless you trust its author."""
    attn_implementation: str | None = None
    """transformers attention backend ("sdpa", "eager", "flash_attention_2"); None lets transformers choose."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""


@dataclass(kw_only=True)
class DataConfig(DataOptions):
    """The data section: where the data is, plus every DataOptions field (format, template, max_seq_len, ...),
    which lorakit.data.options defines, documents and checks once for the run config and the Python API."""

    train: str | None = None
    """Training data: a JSON, JSONL, CSV or Parquet file, or a hub dataset name. Required, unless `tasks` lists
    several datasets (then the other data fields apply to each of them)."""
    validation: str | None = None
    """Validation data file; or leave empty and set validation_fraction."""
    validation_fraction: float = 0.0
    """Fraction of the training records held out for validation (fixed seed) when no file is given."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run; None: run `epochs` epochs."""
    epochs: float = 1.0
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."""
    lr: float = 2e-4
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this; None disables clipping."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of B = lr x this ratio (e.g. 16); None trains A and B at the same rate."""
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1
    """With gradient_checkpointing, recompute only every k-th decoder layer: less recomputation, more memory."""
    loss_chunk_tokens: int | None = 1024
    """Compute the output projection and loss this many tokens at a time, recomputed in backward, so the full
    logits are never held; None: all at once."""
    seed: int = 0
    eval_every: int | None = None
    """Evaluate every N optimizer steps (and always at the end); None: only at the end."""
    save_every: int | None = None
    """Checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 3
    log_every: int = 1
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop keeping the last good checkpoint, or skip the step."""
    resume: str = "never"
    """"never", "auto" (the latest complete checkpoint in output_dir), or a checkpoint directory."""
    tensorboard: bool = False
    memory_check: bool = True
    """Before loading the model, refuse a run whose predicted peak memory (`lorakit plan`) exceeds the memory
    available, naming settings that would fit; false (or `lorakit train --force`) trains anyway."""


@dataclass(kw_only=True)
class SpeedConfig:
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer and the loss (fuses norms, rotary embedding, activations, casts and the
    softmax of the loss). Compiling takes 30-60 s once, so auto compiles only runs of at least 300 steps on a
    model of at least 20M parameters, with a 16-bit base (not 4/8-bit), no gradient checkpointing, and a C++
    compiler on CPU; on: always (an error if it cannot); off: never."""
    adapter_compute: Literal["auto", "adapter"] = "auto"
    """auto: LoRA's matmuls run in the base layer's dtype (bf16 on a bf16 base) while the adapter weights stay
    fp32 master copies; adapter: in the adapter's dtype (fp32 activations, as PEFT computes; slower)."""


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Used when torchrun starts the run on several processes (WORLD_SIZE > 1), ignored otherwise. ddp: every
    process holds the whole base model and trains on its share of each step's micro-batches; the LoRA
    gradients are summed across processes. fsdp: the same, with each decoder layer's frozen weights sharded
    across the processes (PyTorch FSDP2), so each holds about 1/N of them; not for 4/8-bit bases."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl when CUDA is available, else gloo (CPU)."""
    timeout_s: int = 1800
    """How long a process waits for the others in a collective before failing (instead of hanging)."""


@dataclass(kw_only=True)
class TaskConfig:
    name: str
    """The task's adapter name (1-64 letters, digits, '_' or '-'); it is saved to <output_dir>/adapter/<name>."""
    train: str
    """The task's training data file (read with the data section's format, template and length options)."""
    validation: str | None = None
    """The task's validation data file; none: this task is not evaluated."""
    lora: LoraConfig | None = None
    """This adapter's LoRA options (rank, targets, ...), replacing the run's lora section for it; none: the run's."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    objective: str = "sft"
    """The way of training: sft (supervised fine-tuning on the data's supervised tokens). Each way is a recipe in
    lorakit.recipes (RECIPES)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Training speed options; the defaults are the fast path."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes under torchrun; a single process ignores it."""
    output_dir: str = "runs/lorakit"
    """Where the adapter, checkpoints, metrics and plots go."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Several adapters trained in one run, one per task: each batch holds rows of every task, each row routed
    through its task's adapter, so one pass over the frozen base trains them all; each adapter equals what
    training it alone on the same rows would give. E.g. [{name: sql, train: sql.jsonl}, {name: chat, train:
    chat.jsonl, lora: {r: 16}}]. Leave data.train empty then."""
    deploy_targets: list[str] = field(default_factory=list)
    """Servers the adapter is for: any of vllm, llama.cpp, ollama, peft. Before the model loads, the lora section
    is checked against what each accepts (as `lorakit check` does): one that would refuse the adapter stops the
    run naming the lora field to change (remove the target to train anyway); silently mishandled options are
    logged. E.g. [vllm, ollama]."""

    def adapters(self) -> list[tuple[str, LoraConfig]]:
        """The adapters this run trains, as (adapter name, its LoRA config): one per task (the task's own lora,
        else the run's), or the run's lora section as "default"."""
        return [(task.name, task.lora or self.lora) for task in self.tasks] or [("default", self.lora)]


# ---- loading --------------------------------------------------------------------------------------------
def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.path=value` overrides, validate everything at once: the problems of
    every override and of the config they produce are reported together."""
    path = Path(path)
    raw = _read_config_file(path)
    problems: list[str] = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except ConfigError as err:  # keep going: the next overrides and the config may have problems too
            problems += err.problems
    try:
        config = run_config_from_dict(raw, where=str(path))
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, where=str(path))
    return config


def _read_config_file(path: Path) -> dict:
    """The file's top-level mapping; anything else is a one-line ConfigError naming the path."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", where="run config") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the run config's YAML file (e.g. {path / 'run.yaml'})",
                          where="run config") from None
    except OSError as err:  # permission denied, an unreadable device, ...
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{path}: cannot read it ({reason})", where="run config") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text: byte offset {err.start})",
                          where="run config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{_yaml_place(path, err)}: not valid YAML ({_one_line(err)})", where="run config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, speed, distributed, output_dir)", where="run config")
    return raw


def _yaml_place(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the source (the place is given separately)."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(err)
    return " ".join(text.split())


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (2e-4, true, [q_proj, v_proj])."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: must look like section.field=value, e.g. train.lr=2e-4", where="--set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({_one_line(err)})", where="--set") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section", where="--set")
    node[parts[-1]] = value


def run_config_from_dict(raw: dict, *, where: str = "run config") -> RunConfig:
    problems: list[str] = []
    config = _build(RunConfig, raw, "", problems)
    if config is not None:
        problems += _task_problems(config)
    if problems:
        raise ConfigError(problems, where=where)
    return config


def _task_problems(config: RunConfig) -> list[str]:
    """What the fields allow one by one but not together: data.train or tasks, unique valid task names."""
    from .lora.model import ADAPTER_NAME

    if not config.tasks:
        return [] if config.data.train is not None else [f"data.train: required ({FIELD_HINTS[('DataConfig', 'train')]})"]
    problems = []
    if config.data.train is not None or config.data.validation is not None or config.data.validation_fraction:
        problems.append("data.train / data.validation / data.validation_fraction: remove them; with tasks, each task "
                        "names its own train (and validation) file")
    seen = set()
    for i, task in enumerate(config.tasks):
        if not ADAPTER_NAME.match(task.name):
            problems.append(f"tasks[{i}].name: {task.name!r} is not a valid adapter name; use 1-64 letters, digits, "
                            "'_' or '-', starting with a letter or digit")
        elif task.name in seen:
            problems.append(f"tasks[{i}].name: {task.name!r} is used twice; each task needs its own adapter name")
        seen.add(task.name)
    return problems


def _build(cls: type, values: Any, path: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `values`, appending a message per problem; None if any."""
    if cls is LoraConfig:
        try:
            return LoraConfig.from_dict(values if values is not None else {}, where="lora")
        except ConfigError as err:
            problems.extend(f"{path}.{p}" for p in err.problems)  # each LoraConfig problem starts with its field
            return None
    if not isinstance(values, dict):
        problems.append(f"{path or 'the config'}: expected a mapping, got {_describe(values)}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{_join(path, key)}: unknown key{hint}; known keys: {', '.join(fields)}")
    kwargs = {}
    before = len(problems)
    for name, f in fields.items():
        where = _join(path, name)
        if name not in values:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                problems.append(f"{where}: required{_field_doc(cls, name)}")
            continue
        known = len(problems)
        kwargs[name] = _coerce(hints[name], values[name], where, problems)
        if len(problems) == known:  # range-check every well-typed field, not only those before the first problem
            _check_range(cls, name, kwargs[name], path, problems)
    return cls(**kwargs) if len(problems) == before else None


# Ranges beyond the type: (section class, field) -> (test, what is allowed). None passes (optional fields).
RANGES = {
    ("TrainConfig", "max_steps"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "epochs"): (lambda v: v > 0, "a positive number"),
    ("TrainConfig", "batch_size"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "grad_accum"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "lr"): (lambda v: v > 0, "a positive number"),
    ("TrainConfig", "warmup_steps"): (lambda v: v >= 0, "0 or more"),
    ("TrainConfig", "weight_decay"): (lambda v: v >= 0, "0 or more"),
    ("TrainConfig", "max_grad_norm"): (lambda v: v > 0, "a positive number, or null for no clipping"),
    ("TrainConfig", "loraplus_lr_ratio"): (lambda v: v > 0, "a positive number"),
    ("TrainConfig", "checkpoint_every"): (lambda v: v >= 1, "a positive integer (1: every layer)"),
    ("TrainConfig", "loss_chunk_tokens"): (lambda v: v >= 1, "a positive integer, or null for the full logits"),
    ("TrainConfig", "eval_every"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "save_every"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "keep_checkpoints"): (lambda v: v > 0, "a positive integer"),
    ("TrainConfig", "log_every"): (lambda v: v > 0, "a positive integer"),
    ("DistributedConfig", "timeout_s"): (lambda v: v > 0, "a positive number of seconds"),
    ("DataConfig", "validation_fraction"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("RunConfig", "deploy_targets"): (lambda v: isinstance(v, list) and all(t in DEPLOY_TARGETS for t in v),
                                      f"a list of deployment targets from: {', '.join(DEPLOY_TARGETS)}"),
}


def _check_range(cls: type, name: str, value: Any, path: str, problems: list[str]) -> None:
    rule = RANGES.get((cls.__name__, name))
    if rule is not None and value is not None and not rule[0](value):
        problems.append(f"{_join(path, name)}: must be {rule[1]}, got {value!r}")
    # A section whose fields are defined in another package checks them there (data: DataOptions), so the YAML
    # file and that package's Python API refuse the same values with the same messages.
    own_checks = getattr(cls, "field_problems", None)
    if own_checks is not None:
        problems.extend(_join(path, problem) for problem in own_checks(name, value))


def _coerce(kind: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if dataclasses.is_dataclass(kind) or kind is LoraConfig:
        return _build(kind, value, where, problems)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: report its own problems
            return _coerce(sections[0], value, where, problems)
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, where, trial)
            if not trial:
                return result
        problems.append(f"{where}: expected {' or '.join(_name(a) for a in args)}, got {_describe(value)}")
        return value
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in args:
            problems.append(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list of {args[0].__name__.removesuffix('Config').lower()} entries, "
                            f"got {_describe(value)}")
            return value
        return [_build(args[0], item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            problems.append(f"{where}: expected a mapping of names to names, got {_describe(value)}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if kind is float:
        number = value
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 2e-4 as a string (it wants 2.0e-4); accept what users write.
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            problems.append(f"{where}: expected a number, got {_describe(value)}")
            return value
        try:
            number = float(number)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan and .inf, "nan", 1e999
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return value
        return number
    if kind is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {_describe(value)}")
        return value
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _field_doc(cls: type, name: str) -> str:
    return f" ({FIELD_HINTS[(cls.__name__, name)]})" if (cls.__name__, name) in FIELD_HINTS else ""


FIELD_HINTS = {
    ("RunConfig", "model"): "a section with at least name_or_path",
    ("RunConfig", "data"): "a section with at least train: path/to/train.jsonl",
    ("ModelConfig", "name_or_path"): "a local model directory or a hub id",
    ("DataConfig", "train"): "a JSON, JSONL, CSV or Parquet file",
}


# ---- reference text (lorakit train --help) ----------------------------------------------------------------
def field_reference() -> str:
    """Every run-config field with its type, default and docstring, read from the dataclasses' source."""
    import ast
    import inspect

    sections = [("model", ModelConfig), ("model.quantization", QuantizationConfig), ("lora", LoraConfig), ("data", DataConfig), ("train", TrainConfig),
                ("speed", SpeedConfig), ("distributed", DistributedConfig), ("tasks[i]", TaskConfig), ("", RunConfig)]
    listed = {name.split(".")[0] for name, _ in sections}  # "tasks[i]" (its entries) keeps "tasks" listed
    lines = []
    for section, cls in sections:
        docs: dict[str, str] = {}
        for owner in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # data: DataOptions' too
            body = ast.parse(inspect.getsource(owner)).body[0].body
            for node, after in zip(body, body[1:] + [None]):
                if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(after.value.value).split())
        lines.append(f"{section}:" if section else "top level:")
        own = set(cls.__dict__.get("__annotations__", {}))  # a section's own fields (data: where the data is) first
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
            if section == "" and f.name in listed:  # sections are listed above with their fields
                continue
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f" = {f.default_factory()!r}"
            else:
                default = " (required)"
            kind = str(f.type).replace("typing.", "")
            lines.append(f"  {f.name}: {kind}{default}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
