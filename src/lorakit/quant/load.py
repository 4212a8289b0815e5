"""Loading a 16-bit checkpoint straight into a 4-bit or 8-bit model, one tensor at a time.

The model is first built with its parameters on the meta device (no memory; buffers such as rotary
tables are computed as usual). Then each checkpoint tensor is read, and a linear layer's weight is
quantized the moment it arrives and its 16-bit copy dropped, so the peak stays near the quantized model
plus the largest single tensor, never the whole model in 16 bits. The output head and embeddings stay
in the compute dtype, as in QLoRA and transformers' bitsandbytes integration.

What this loader does not know (a checkpoint already quantized on disk, .bin files, tensor names that
transformers renames while loading) goes to transformers' own bitsandbytes loading, with a note.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError
from .bnb import QuantSpec, quantize_linear, require_bitsandbytes
from .lora_layer import prepare_for_lora
from .stream import TensorEntry, iter_tensors, read_header


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter created inside lives on the meta device (costs nothing); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(source: str, *, revision: str | None = None) -> list[Path] | None:
    """The checkpoint's .safetensors shards (downloaded for a hub id), or None when it has none."""
    from transformers.utils import cached_file

    def fetch(filename: str) -> Path | None:
        found = cached_file(source, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        return Path(found) if found else None

    index = fetch("model.safetensors.index.json")
    if index is None:
        single = fetch("model.safetensors")
        return [single] if single is not None else None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: unreadable shard index ({err})") from None
    bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n in (".", "..")]
    if bad:
        raise CheckpointError(f"{index}: shard names must be plain file names next to the index, got {bad[:3]}")
    files = [fetch(n) for n in names]
    missing = [n for n, f in zip(names, files) if f is None]
    if missing:
        raise CheckpointError(f"{index} lists shards that are not there: {missing[:5]}")
    return files


def quantize_targets(model: nn.Module) -> set[str]:
    """Names of the linear layers to quantize: all but the output head and modules kept in fp32."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    names = set()
    for name, module in model.named_modules():
        is_linear = type(module) is nn.Linear or type(module).__name__ == "Conv1D"
        if is_linear and module is not head and not any(k in name.split(".") for k in keep):
            names.add(name)
    return names


def map_names(model: nn.Module, entries: list[TensorEntry]) -> tuple[dict[str, str], list[str]]:
    """Checkpoint name -> model state-dict name, and the checkpoint names that match nothing."""
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignorable = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    mapping, unknown = {}, []
    for entry in entries:
        name = entry.name
        candidates = [name, f"{prefix}.{name}"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        match = next((c for c in candidates if c in expected), None)
        if match is not None:
            mapping[name] = match
        elif not any(p.search(name) for p in ignorable) and not name.endswith((".inv_freq", ".masked_bias", ".attn.bias")):
            unknown.append(name)
    return mapping, unknown


def check_shape(entry: TensorEntry, tensor: torch.Tensor, expected) -> None:
    """CheckpointError naming the tensor when the checkpoint's shape is not the model's."""
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"checkpoint tensor {entry.name!r} in {entry.file} has shape {list(tensor.shape)}, "
                              f"the model expects {list(expected)}; it does not belong to this config")


def require_complete(source: str, missing: list[str]) -> None:
    """CheckpointError naming the model tensors the checkpoint did not fill, if any."""
    if missing:
        raise CheckpointError(f"the checkpoint at {source} lacks tensors the model needs: {missing[:5]}"
                              f"{' and more' if len(missing) > 5 else ''}; it is incomplete or for another config")


def _set_tensor(model: nn.Module, target: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = tensor.to(device)


def build_on_meta(config, files: list[Path], *, dtype: torch.dtype, options: dict):
    """(the model of `config` with its parameters on meta, the checkpoint entries it uses, checkpoint name ->
    model name) for the streaming loaders; or the reason (a str) when the checkpoint's names are not its own."""
    from transformers import AutoModelForCausalLM

    entries = [entry for path in files for entry in read_header(path)]
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=options.get("trust_remote_code", False),
                                                 attn_implementation=options.get("attn_implementation"))
    mapping, unknown = map_names(model, entries)
    if unknown:
        return f"checkpoint tensor names such as {unknown[:3]} are not this model's own"
    return model, [e for e in entries if e.name in mapping], mapping


def stream_quantized(source: str, config, spec: QuantSpec, files: list[Path], *, device: torch.device,
                     from_config_options: dict) -> nn.Module | tuple[None, str]:
    """Build the model and fill it from `files`, quantizing linear weights as they are read.

    Returns the model, or (None, reason) when the checkpoint's tensor names are not the model's own
    (the caller then uses transformers' loader, which knows its renames).
    """
    require_bitsandbytes()
    built = build_on_meta(config, files, dtype=spec.compute_dtype, options=from_config_options)
    if isinstance(built, str):
        return None, built
    model, entries, mapping = built
    targets = quantize_targets(model)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for entry, tensor in iter_tensors(files, entries):
        target = mapping[entry.name]
        module_name, _, leaf = target.rpartition(".")
        expected = model.get_submodule(module_name)._parameters.get(leaf)
        if expected is not None:
            check_shape(entry, tensor, expected.shape)
        if module_name in targets and leaf == "weight":
            original = model.get_submodule(module_name)
            conv1d = type(original).__name__ == "Conv1D"
            weight = tensor.T.contiguous() if conv1d else tensor  # (out, in)
            layer = quantize_linear(weight, None, spec, device, source_cls=type(original))
            if original.bias is not None:
                layer.bias = original.bias  # loaded already, or still on meta and filled when read
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            targets.discard(module_name)
            _return_freed_memory()  # quantizing leaves freed temporaries between the packed weights kept
        else:
            fp32 = any(k in module_name.split(".") for k in keep)
            _set_tensor(model, target, tensor, device, torch.float32 if fp32 else spec.compute_dtype)
        del tensor
    model.tie_weights()
    for module in model.modules():  # buffers computed at construction (rotary tables) were made on the CPU
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    require_complete(source, [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
                              if t.is_meta])
    _return_freed_memory()
    # Recorded as transformers records it, so save_pretrained writes a 4-bit checkpoint that loads back.
    model.config.quantization_config = bnb_config(spec)
    model.requires_grad_(False)
    model.eval()
    return model


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LEAN_MMAP_THRESHOLD = 4 << 20


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def lean_allocator() -> bool:
    """Serve allocations of 4 MiB and up with mmap, so freed buffers go straight back to the OS.

    glibc's default threshold grows to 32 MiB as large blocks are freed; below it, freed buffers stay in the
    heap, fragmented between live ones. Quantizing hundreds of weights and then training leaves gigabytes
    there: the 7B benchmark (bench/memory_7b.py) peaked at 6.53 GB by default and 5.3-5.7 GB with 4 MiB.
    Lower is leaner but slower: at 1 MiB the 7B peak was 5.22 GB, but a smaller model's step took 1.6x as
    long, every activation buffer being mapped and faulted in afresh (at 4 MiB: no slower than default).
    A quantized base is asked for to save memory, so lorakit sets it then; a threshold the user chose
    (GLIBC_TUNABLES) or another allocator (LD_PRELOAD) is left alone. Returns whether it was set.
    """
    if "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "") or os.environ.get("LD_PRELOAD"):
        return False
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD) == 1)


def _return_freed_memory() -> None:
    # Whatever the heap still holds of freed buffers after loading goes back to the OS (glibc only).
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def bnb_config(spec: QuantSpec):
    """transformers' BitsAndBytesConfig for `spec`."""
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=spec.compute_dtype)


def transformers_quantized(source: str, spec: QuantSpec | None, *, device: torch.device, options: dict) -> nn.Module:
    """transformers' own bitsandbytes loading (spec None: the checkpoint is already quantized on disk)."""
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    kwargs = dict(options)
    if spec is not None:
        kwargs["quantization_config"] = bnb_config(spec)
        kwargs["dtype"] = spec.compute_dtype
    model = AutoModelForCausalLM.from_pretrained(source, device_map={"": str(device)}, **kwargs)
    prepare_for_lora(model)
    model.requires_grad_(False)
    model.eval()
    return model


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def load_quantized(source: str, spec: QuantSpec, *, device: torch.device, options: dict,
                   log: Callable[[str], None] = lambda _: None) -> nn.Module:
    """A 4/8-bit model from `source` (local directory or hub id): streamed when possible, else via transformers."""
    from transformers import AutoConfig

    lean_allocator()
    if spec.bits == 8:
        # bitsandbytes logs a warning on every LLM.int8 matmul whose input is not fp16 (it casts, as it must).
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_warning)
    config = AutoConfig.from_pretrained(source, trust_remote_code=options.get("trust_remote_code", False),
                                        revision=options.get("revision"))
    if getattr(config, "quantization_config", None) is not None:
        log(f"note: {source} is already quantized on disk ({config.quantization_config.get('quant_method', '?') if isinstance(config.quantization_config, dict) else 'quantized'}); "
            "loading it as it is and ignoring model.quantization")
        return transformers_quantized(source, None, device=device, options=options)
    files = checkpoint_files(source, revision=options.get("revision"))
    reason = "it has no .safetensors weights"
    if files is not None:
        model = stream_quantized(source, config, spec, files, device=device, from_config_options=options)
        if not isinstance(model, tuple):
            return prepare_for_lora(model)
        reason = model[1]
    log(f"note: loading through transformers' bitsandbytes path ({reason}); peak memory while loading may "
        "exceed the quantized size")
    return transformers_quantized(source, spec, device=device, options=options)
