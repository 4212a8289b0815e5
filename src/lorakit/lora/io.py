"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's (`base_model.model.<module>.lora_A.weight`, `lora_embedding_A`,
`lora_magnitude_vector`, full `modules_to_save` copies under the module's own name), so files move
both ways between PEFT (and the servers that read PEFT files) and lorakit.

Loading is a trust boundary: nothing is unpickled except through `torch.load(weights_only=True)`,
every number in the config is checked (finite, in range), the safetensors header is checked (no duplicate
names, at most 100 MB, lorakit.safetensors_header), and every tensor is checked (name, shape, dtype,
finiteness) before the model is touched. lora/load.py puts these together: load_adapter onto a plain model,
and validate_adapter, the same checks without loading anything (`lorakit check`).

Which tensors an adapter has and what they are called is lora/layout.py's.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import write_atomic, write_text_atomic
from ..errors import AdapterError, ConfigError
from ..safetensors_header import TensorEntry, read_header
from .config import ALLOWED, LoraConfig, field_names, valid_init
from .inject import CLASSIFIER_HEADS, candidate_modules
from .layout import KEY_FORM, PREFIX, WrappedModel, adapter_tensors, bias_tensors, optional_tensors, peft_config_dict
from .methods import config_class_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
DEFAULT_NAME = "default"
FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The base model file an adapter was trained on (path, sha256), where the base came from one file (a GGUF); kept
# apart from CONFIG_FILE, whose unknown keys PEFT warns about.
BASE_FILE = "base_file.json"
# PEFT config keys that describe the file, not the adapter; any value is fine.
INFORMATIONAL_KEYS = {"peft_type", "auto_mapping", "revision", "inference_mode", "peft_version",
                      "megatron_core", "qalora_group_size", "library_name"}
# ---- save -------------------------------------------------------------------------------------------
def save_adapters(model: WrappedModel, path: Path, names: list[str]) -> None:
    for name in names:
        init = model.adapter_configs[name].init_lora_weights
        if isinstance(init, str) and init.startswith("pissa"):
            warnings.warn(
                f"adapter {name!r} was initialised with PiSSA: its weights apply to the residual base weights this "
                "model now holds, not to the original checkpoint; ship the merged model (merge_and_unload) or the "
                "residual base with it",
                stacklevel=3,
            )
        directory = path if name == DEFAULT_NAME else path / name
        if directory.exists() and not directory.is_dir():
            raise AdapterError(f"cannot save adapter {name!r}: {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: p.detach().to("cpu").contiguous().clone() for k, p in adapter_tensors(model, name).items()}
        write_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        write_text_atomic(directory / CONFIG_FILE, json.dumps(peft_config_dict(model, name), indent=2) + "\n")
        base_file = getattr(model.model, "lorakit_base_file", None)
        if base_file:  # a GGUF base: which file, by content, so it can be recognised where the adapter is applied
            write_text_atomic(directory / BASE_FILE, json.dumps(base_file, indent=2) + "\n")


# ---- load -------------------------------------------------------------------------------------------
def read_adapter_config(directory: str | Path) -> LoraConfig:
    """Read an adapter_config.json written by lorakit or PEFT into a LoraConfig (or the config class of the
    method registered for its peft_type)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise AdapterError(f"{directory}: not a directory; pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not path.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_FILE}; expected a folder written by save_adapter or PEFT's save_pretrained")
    try:
        # Python's json reads NaN, Infinity and overflowing numbers (1e999) as floats; keep them visible.
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=_NonFinite, parse_float=_parse_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object of LoRA options")
    non_finite = [f"{where} is {token}" + (f" ({field} must be {ALLOWED[field]})" if field in ALLOWED else "")
                  for field, where, token in _non_finite(raw)]
    if non_finite:
        raise AdapterError(f"{path}: {'; '.join(non_finite)}. JSON numbers must be finite: NaN, Infinity and "
                           "numbers too large for a float (such as 1e999) are refused")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    config_class = config_class_for(peft_type)
    if config_class is None:
        raise AdapterError(f"{path}: this is a {peft_type} adapter; lorakit loads LoRA adapters only")
    known = field_names()
    values, unsupported = {}, []
    for key, value in raw.items():
        if key in known:
            values[key] = value
        elif key in INFORMATIONAL_KEYS or value is None or value is False or value in ({}, [], ""):
            continue  # describes the file, or a PEFT feature left off
        else:
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise AdapterError(f"{path}: uses PEFT options lorakit does not support: {', '.join(unsupported)}")
    if not valid_init(values.get("init_lora_weights", True)):
        values["init_lora_weights"] = True  # weights come from the file; the init scheme no longer matters
    try:
        return config_class.from_dict(values, where=str(path))
    except ConfigError as err:
        raise AdapterError(str(err)) from None


class _NonFinite(float):
    """A NaN or infinite JSON number, spelled as the file spelled it (NaN, -Infinity, 1e999)."""

    def __new__(cls, text: str) -> "_NonFinite":
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def _parse_float(text: str) -> float:
    number = float(text)
    return number if math.isfinite(number) else _NonFinite(text)


def _non_finite(value: Any, where: str = "", field: str = "") -> Iterator[tuple[str, str, str]]:
    """(top-level field, where, token) for every non-finite number inside `value`."""
    if isinstance(value, _NonFinite):
        yield field, where, value.text
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}[{key!r}]" if where else str(key), field or str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{i}]", field)


def _check_size(path: Path, budget_bytes: int) -> None:
    # Refuse before reading: a file much larger than its config implies is corrupt or hostile.
    size = path.stat().st_size
    if size > budget_bytes:
        raise AdapterError(
            f"{path}: {size:,} bytes, more than this adapter's config allows ({budget_bytes:,} at most); "
            "refusing to read it"
        )


def _refuse_pickle_on_old_torch(pickle_file: Path) -> None:
    # torch.load's weights_only unpickler has a known hole before torch 2.10 (CVE-2026-24747); pip keeps an
    # older torch that meets an older floor, so check the torch that is actually installed.
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < (2, 10):
        raise AdapterError(f"{pickle_file}: refused; reading a pickled adapter safely needs torch>=2.10 (this is "
                           f"torch {torch.__version__}). Upgrade torch, or convert the file to safetensors with a "
                           "trusted tool.")


def _read_tensors(directory: Path, budget_bytes: int) -> tuple[Path, dict[str, torch.Tensor]]:
    st, pickle_file = directory / WEIGHTS_FILE, directory / PICKLE_FILE
    if st.is_file():
        _check_size(st, budget_bytes)
        read_header(st, error=AdapterError)  # what safetensors lets through: duplicate names, a huge header
        try:
            return st, load_file(str(st))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterError(f"{st}: not a valid safetensors file ({err})") from None
    if pickle_file.is_file():
        _check_size(pickle_file, budget_bytes)
        _refuse_pickle_on_old_torch(pickle_file)
        try:
            # Never anything but weights_only: a pickle can run code (CVE-2025-32434 and kin).
            tensors = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means we refuse the file
            raise AdapterError(
                f"{pickle_file}: refused; it holds more than plain tensors or is corrupt ({type(err).__name__}). "
                "Convert it to safetensors with a trusted tool."
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"{pickle_file}: expected a mapping of tensor names to tensors")
        return pickle_file, tensors
    raise AdapterError(f"{directory}: no {WEIGHTS_FILE} (or {PICKLE_FILE}) next to {CONFIG_FILE}")


# ---- checks: loading and validate_adapter ------------------------------------------------------------
def check_file_tensors(source: Path, tensors: Mapping[str, Any]) -> None:
    """What needs no model: PEFT's name form and a dense float dtype for every tensor (a torch.Tensor or a
    safetensors header entry)."""
    for key, tensor in tensors.items():
        if not KEY_FORM.fullmatch(key):
            raise AdapterError(f"{source}: tensor name {key!r} is not PEFT's form ({PREFIX}<module path>.<tensor>, "
                               "dotted parts of letters, digits, '_' and '-'); the file is corrupt or hostile")
        layout = getattr(tensor, "layout", torch.strided)  # header entries are dense by construction
        if layout != torch.strided or tensor.dtype not in FILE_DTYPES:
            raise AdapterError(
                f"{source}: tensor {key!r} is {tensor.dtype} ({layout}); adapter tensors must be dense "
                "float16, bfloat16, float32 or float64"
            )


def check_against_model(model: WrappedModel, name: str, source: Path,
                        tensors: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """File key -> the parameter it fills, once every tensor adapter `name` of `model` expects is present,
    nothing else is, and every shape matches. Needs shapes only: header entries and a model on the meta
    device will do."""
    aliases = {alt: key for key, alt, _ in bias_tensors(model, name)}
    expected = adapter_tensors(model, name)
    optional = optional_tensors(model, name)
    targets = {key: expected.get(aliases.get(key, key), optional.get(aliases.get(key, key))) for key in tensors}
    unexpected = [k for k, target in targets.items() if target is None]
    if unexpected:
        raise AdapterError(
            f"{source}: tensor {unexpected[0]!r} does not belong to this model's adapter "
            f"({len(unexpected)} unexpected in all); was it trained on a different base model or config?"
        )
    present = {aliases.get(k, k) for k in tensors}
    missing = [k for k in expected if k not in present]
    if missing:
        raise AdapterError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all); the file is incomplete")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise AdapterError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(targets[key].shape)}; the adapter was made for a different base model or rank"
            )
    return targets


def check_finite(source: Path, key: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{source}: tensor {key!r} contains NaN or inf values")


def _size_budget(model: WrappedModel, name: str) -> int:
    params = [*adapter_tensors(model, name).values(), *optional_tensors(model, name).values()]
    # Every tensor in fp32 (what PEFT writes for fp32 adapters) plus 10%, and room for the header.
    return int(sum(p.numel() * 4 for p in params) * 1.1) + (1 << 20)


def read_checked_header(directory: Path) -> tuple[Path, dict[str, TensorEntry]]:
    """The safetensors file and its header entries, each name and dtype checked; nothing else is read.
    Safetensors only: a pickled adapter_model.bin is refused here, not unpickled."""
    source = directory / WEIGHTS_FILE
    if not source.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise AdapterError(f"{directory / PICKLE_FILE}: checked as safetensors only (a pickle can run code "
                               f"when it is read); convert it to {WEIGHTS_FILE} with a trusted tool")
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    entries = {entry.name: entry for entry in read_header(source, error=AdapterError)}
    check_file_tensors(source, entries)
    return source, entries


def check_header_against_model(model: WrappedModel, name: str, source: Path, entries: Mapping[str, Any]) -> None:
    """The file's size for adapter `name` of `model`, then its tensor names and shapes (check_against_model)."""
    _check_size(source, _size_budget(model, name))
    check_against_model(model, name, source, entries)


def check_file_values(source: Path, keys: Iterable[str]) -> None:
    """Every tensor finite, read one at a time (a file may be larger than what memory should hold at once)."""
    try:
        with safe_open(str(source), framework="pt") as f:
            for key in keys:
                check_finite(source, key, f.get_tensor(key))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{source}: not a valid safetensors file ({err})") from None


def drop_absent_modules_to_save(model: nn.Module, config: LoraConfig, directory: Path) -> LoraConfig:
    """PEFT tolerates modules_to_save names that match nothing, and writes some itself: task_type SEQ_CLS adds
    "classifier", "score" and (since PEFT 0.22) "pre_classifier" whatever the model has. A file is loaded as PEFT
    loads it, so such names are dropped here (with a warning unless PEFT added them: CLASSIFIER_HEADS); a config
    built by hand still gets the strict check."""
    wanted = config.modules_to_save
    if not wanted:
        return config
    names = list(candidate_modules(model))
    present = [m for m in dict.fromkeys(wanted) if any(n == m or n.endswith("." + m) for n in names)]
    absent = [m for m in dict.fromkeys(wanted) if m not in present and m not in CLASSIFIER_HEADS]
    if absent:
        warnings.warn(f"{directory}: modules_to_save names {absent} match no module of this model; ignored", stacklevel=4)
    return config.replace(modules_to_save=present or None)


def config_for_model(model: nn.Module, directory: Path, *, is_trainable: bool) -> LoraConfig:
    """The config of the adapter in `directory` as it is loaded onto `model` (the plain model): frozen unless
    is_trainable, modules_to_save the model lacks dropped (as PEFT does), a different base model warned about."""
    config = read_adapter_config(directory).replace(inference_mode=not is_trainable)
    config = drop_absent_modules_to_save(model, config, directory)
    wanted = config.base_model_name_or_path
    actual = getattr(getattr(model, "config", None), "_name_or_path", None)
    if _checked_base_file(model, directory):
        return config  # compared by content: a renamed copy of the file is the same base
    if wanted and actual and Path(str(wanted)).name != Path(str(actual)).name:
        warnings.warn(
            f"{directory}: adapter was trained on base model {wanted!r} but is being loaded onto {actual!r}",
            stacklevel=3,
        )
    return config


def _checked_base_file(model: nn.Module, directory: Path) -> bool:
    """When both the adapter (BASE_FILE) and the model know the base file they came from: warn if its sha256
    differs, and return True."""
    ours = getattr(model, "lorakit_base_file", None)
    try:
        trained_on = json.loads((directory / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (ours and isinstance(trained_on, dict) and trained_on.get("sha256")):
        return False
    if trained_on.get("sha256") != ours.get("sha256"):
        warnings.warn(
            f"{directory}: adapter was trained on {trained_on.get('path')} (sha256 {str(trained_on.get('sha256'))[:16]}...) "
            f"but is being applied to {ours.get('path')} (sha256 {str(ours.get('sha256'))[:16]}...), a different file: "
            "its outputs will not be the ones it was trained for",
            stacklevel=4,
        )
    return True


def fill_adapter(model: WrappedModel, name: str, directory: Path) -> None:
    """Read the tensors in `directory`, check all of them against adapter `name` of `model`, then copy them in."""
    source, tensors = _read_tensors(directory, _size_budget(model, name))
    check_file_tensors(source, tensors)
    targets = check_against_model(model, name, source, tensors)
    for key, tensor in tensors.items():
        check_finite(source, key, tensor)
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor.to(device=targets[key].device, dtype=targets[key].dtype))


def load_adapter_into(model: WrappedModel, path: str | Path, name: str, *, is_trainable: bool = False) -> None:
    """Add adapter `name` to `model` from the directory `path`; on any error the model is left as it was."""
    directory = Path(path)
    config = config_for_model(model.model, directory, is_trainable=is_trainable)
    model.add_adapter(name, config, _init=False)
    try:
        fill_adapter(model, name, directory)
    except Exception:
        model.delete_adapter(name)
        raise
