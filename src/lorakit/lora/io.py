"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's (`base_model.model.<module>.lora_A.weight`, `lora_embedding_A`,
`lora_magnitude_vector`, full `modules_to_save` copies under the module's own name), so files move
both ways between PEFT (and the servers that read PEFT files) and lorakit.

Loading is a trust boundary: nothing is unpickled except through `torch.load(weights_only=True)`,
every number in the config is checked (finite, in range), the safetensors header is checked (no duplicate
names, at most 100 MB, lorakit.safetensors_header), and every tensor is checked (name, shape, dtype,
finiteness) before the model is touched. `validate_adapter` runs the same checks without loading anything
(`lorakit check`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import write_atomic, write_text_atomic
from ..errors import AdapterError, ConfigError
from ..safetensors_header import TensorEntry, read_header
from .config import ALL_LINEAR, ALLOWED, LoraConfig, _valid_init, field_names
from .layer import LoraEmbedding, LoraLinear

if TYPE_CHECKING:
    from .model import LoraModel

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
DEFAULT_NAME = "default"
FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# PEFT config keys that describe the file, not the adapter; any value is fine.
INFORMATIONAL_KEYS = {"peft_type", "auto_mapping", "revision", "inference_mode", "peft_version",
                      "megatron_core", "qalora_group_size", "library_name"}
# PEFT's tensor names: the prefix, then module path and tensor name in dotted parts; no '/', '..' or spaces.
KEY_FORM = re.compile(r"base_model\.model(\.[\w-]+)+")


# ---- names ------------------------------------------------------------------------------------------
def adapter_tensors(model: "LoraModel", name: str) -> dict[str, nn.Parameter]:
    """PEFT file key -> the live parameter, for every tensor adapter `name` saves."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in model.lora_layers():
        if name in layer.lora_A:
            for suffix, param in layer.peft_tensor_names(name).items():
                out[f"{PREFIX}{path}.{suffix}"] = param
    for path, module in model.full_copies():
        if name in module.copies:
            for pname, param in module.copies[name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = param
    for key, _, param in _bias_tensors(model, name):
        out[key] = param
    return out


def _bias_tensors(model: "LoraModel", name: str) -> list[tuple[str, str, nn.Parameter]]:
    """(file key, alternative spelling, parameter) for the biases adapter `name` trains.

    A bias is spelled `X.base_layer.bias` when this adapter adapts layer X (as PEFT writes it) and `X.bias`
    otherwise, whatever other adapters happen to wrap; loading accepts either spelling, so a file does not
    depend on which unrelated adapters were present when it was written or are present when it is read.
    """
    bias = model.adapter_configs[name].bias
    if bias == "none":
        return []
    wrapped = {path: layer for path, layer in model.lora_layers()}
    own = {path for path, layer in wrapped.items() if name in layer.lora_A}
    found = []
    for pname, param in model.model.named_parameters():
        if not pname.endswith("bias") or ".lora_" in pname or ".original_module." in pname or ".copies." in pname:
            continue
        module_path = pname.removesuffix(".bias")
        layer_path = module_path.removesuffix(".base_layer")
        if layer_path == module_path or layer_path not in wrapped:
            layer_path = module_path  # not the base of a LoRA wrapper
        if bias == "lora_only" and layer_path not in own:
            continue
        long_key, short_key = f"{PREFIX}{layer_path}.base_layer.bias", f"{PREFIX}{layer_path}.bias"
        found.append((long_key, short_key, param) if layer_path in own else (short_key, long_key, param))
    return found


def _optional_tensors(model: "LoraModel", name: str) -> dict[str, nn.Parameter]:
    """Keys PEFT may add that we accept: full embedding weights (PEFT's save_embedding_layers) and, with
    bias="all", the biases PEFT also picks up inside its modules_to_save wrapper: the copy's again (as
    `<module>.modules_to_save.bias`, equal to `<module>.bias`) and the original's (`<module>.original_module.bias`)."""
    out = {
        f"{PREFIX}{path}.base_layer.weight": layer.base_layer.weight
        for path, layer in model.lora_layers()
        if isinstance(layer, LoraEmbedding) and name in layer.lora_A
    }
    if model.adapter_configs[name].bias == "all":
        for path, module in model.full_copies():
            if name not in module.copies:
                continue
            for prefix, part in (("modules_to_save", module.copies[name]), ("original_module", module.original_module)):
                for pname, param in part.named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        out[f"{PREFIX}{path}.{prefix}.{pname}"] = param
    return out


# ---- save -------------------------------------------------------------------------------------------
def peft_config_dict(model: "LoraModel", name: str) -> dict:
    config = model.adapter_configs[name]
    data = config.to_dict()
    if config.target_modules == ALL_LINEAR:
        # Full module names, as PEFT writes all-linear: last components alone could also select layers
        # all-linear leaves out (a head sharing a name with an adapted layer). Unlike PEFT we list only the
        # layers adapted (exclude_modules already applied), so readers that ignore exclude_modules agree too.
        data["target_modules"] = sorted(path for path, layer in model.lora_layers() if name in layer.lora_A)
    elif config.target_modules is None:
        data["target_modules"] = model.target_suffixes[name]  # the default names, resolved: every reader understands them
    data["fan_in_fan_out"] = any(
        isinstance(layer, LoraLinear) and layer.fan_in_fan_out and name in layer.lora_A
        for _, layer in model.lora_layers()
    )
    if not data["base_model_name_or_path"]:
        data["base_model_name_or_path"] = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    data.update(peft_type="LORA", inference_mode=True, lora_bias=False, revision=None)
    return dict(sorted(data.items()))


def save_adapters(model: "LoraModel", path: Path, names: list[str]) -> None:
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


# ---- load -------------------------------------------------------------------------------------------
def read_adapter_config(directory: str | Path) -> LoraConfig:
    """Read an adapter_config.json written by lorakit or PEFT into a LoraConfig."""
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
    if peft_type != "LORA":
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
    if not _valid_init(values.get("init_lora_weights", True)):
        values["init_lora_weights"] = True  # weights come from the file; the init scheme no longer matters
    try:
        return LoraConfig.from_dict(values, where=str(path))
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


def check_against_model(model: "LoraModel", name: str, source: Path,
                        tensors: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """File key -> the parameter it fills, once every tensor adapter `name` of `model` expects is present,
    nothing else is, and every shape matches. Needs shapes only: header entries and a model on the meta
    device will do."""
    aliases = {alt: key for key, alt, _ in _bias_tensors(model, name)}
    expected = adapter_tensors(model, name)
    optional = _optional_tensors(model, name)
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


def _check_and_copy(model: "LoraModel", name: str, source: Path, tensors: dict[str, torch.Tensor]) -> None:
    check_file_tensors(source, tensors)
    targets = check_against_model(model, name, source, tensors)
    for key, tensor in tensors.items():
        check_finite(source, key, tensor)
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor.to(device=targets[key].device, dtype=targets[key].dtype))


def _size_budget(model: "LoraModel", name: str) -> int:
    params = [*adapter_tensors(model, name).values(), *_optional_tensors(model, name).values()]
    # Every tensor in fp32 (what PEFT writes for fp32 adapters) plus 10%, and room for the header.
    return int(sum(p.numel() * 4 for p in params) * 1.1) + (1 << 20)


def _drop_absent_modules_to_save(model: nn.Module, config: LoraConfig, directory: Path) -> LoraConfig:
    """PEFT tolerates modules_to_save names that match nothing, and writes some itself: task_type SEQ_CLS adds
    both "classifier" and "score" whatever the model has. A file is loaded as PEFT loads it, so such names are
    dropped here (with a warning unless PEFT added them); a config built by hand still gets the strict check."""
    wanted = config.modules_to_save
    if not wanted:
        return config
    from .inject import _candidate_modules
    from .model import CLASSIFIER_HEADS

    names = list(_candidate_modules(model))
    present = [m for m in dict.fromkeys(wanted) if any(n == m or n.endswith("." + m) for n in names)]
    absent = [m for m in dict.fromkeys(wanted) if m not in present and m not in CLASSIFIER_HEADS]
    if absent:
        warnings.warn(f"{directory}: modules_to_save names {absent} match no module of this model; ignored", stacklevel=3)
    return config.replace(modules_to_save=present or None)


def load_adapter_into(model: "LoraModel", path: str | Path, name: str, *, is_trainable: bool = False) -> None:
    directory = Path(path)
    config = read_adapter_config(directory).replace(inference_mode=not is_trainable)
    config = _drop_absent_modules_to_save(model.model, config, directory)
    _warn_base_mismatch(model.model, config, directory)
    model.add_adapter(name, config, _init=False)
    try:
        source, tensors = _read_tensors(directory, _size_budget(model, name))
        _check_and_copy(model, name, source, tensors)
    except Exception:
        model.delete_adapter(name)
        raise


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_NAME, *, is_trainable: bool = False):
    """Load an adapter directory onto a plain model (returns a new LoraModel) or a LoraModel (adds to it)."""
    from .model import LoraModel

    if isinstance(model, LoraModel):
        load_adapter_into(model, path, adapter_name, is_trainable=is_trainable)
        return model
    directory = Path(path)
    config = read_adapter_config(directory).replace(inference_mode=not is_trainable)
    config = _drop_absent_modules_to_save(model, config, directory)
    _warn_base_mismatch(model, config, directory)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    lora_model = LoraModel(model, config, adapter_name, _init=False)
    try:
        source, tensors = _read_tensors(directory, _size_budget(lora_model, adapter_name))
        _check_and_copy(lora_model, adapter_name, source, tensors)
    except Exception:
        lora_model.unwrap()
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), p.requires_grad))
        raise
    return lora_model


def validate_adapter(path: str | Path, base: nn.Module | None = None) -> tuple[LoraConfig, dict[str, TensorEntry]]:
    """Every check load_adapter makes, with nothing loaded: the config, the safetensors header, each tensor's
    name and dtype, its shape against `base` (when given) and its values (read one at a time). `base` is the
    model the adapter is for, best built on the meta device; it gets wrapped, so pass one to throw away.
    Returns the config and the header's entries. Safetensors only: a pickled adapter_model.bin is refused,
    not unpickled."""
    from .model import LoraModel

    directory = Path(path)
    config = read_adapter_config(directory)
    source = directory / WEIGHTS_FILE
    if not source.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise AdapterError(f"{directory / PICKLE_FILE}: checked as safetensors only (a pickle can run code "
                               f"when it is read); convert it to {WEIGHTS_FILE} with a trusted tool")
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    entries = {entry.name: entry for entry in read_header(source, error=AdapterError)}
    check_file_tensors(source, entries)
    if base is not None:
        config = _drop_absent_modules_to_save(base, config, directory)
        lora_model = LoraModel(base, config.replace(inference_mode=True), DEFAULT_NAME, _init=False)
        _check_size(source, _size_budget(lora_model, DEFAULT_NAME))
        check_against_model(lora_model, DEFAULT_NAME, source, entries)
    try:
        with safe_open(str(source), framework="pt") as f:
            for key in entries:
                check_finite(source, key, f.get_tensor(key))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{source}: not a valid safetensors file ({err})") from None
    return config, entries


def _warn_base_mismatch(model: nn.Module, config: LoraConfig, directory: Path) -> None:
    wanted = config.base_model_name_or_path
    actual = getattr(getattr(model, "config", None), "_name_or_path", None)
    if wanted and actual and Path(str(wanted)).name != Path(str(actual)).name:
        warnings.warn(
            f"{directory}: adapter was trained on base model {wanted!r} but is being loaded onto {actual!r}",
            stacklevel=3,
        )
