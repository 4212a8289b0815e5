"""Loading the frozen base model and its tokenizer, with the device and dtype chosen for the machine.

The real `from_pretrained` path: a local directory or a hub id (users have internet; tests use local
directories saved from tiny configs), or a GGUF file (gguf_base.py: dequantized once into a cached directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(requested: str = "auto") -> torch.device:
    """auto: CUDA, then Apple MPS, then the CPU. An explicit choice that is not available is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(requested, False):
        raise ConfigError(f"model.device: {requested!r} is not available on this machine; use auto or cpu", where="run config")
    return torch.device(requested)


def cpu_has_bf16_matmul() -> bool:
    """True on CPUs with bf16 matrix units (Intel AMX or AVX-512-BF16), where bf16 matmul is several times fp32's."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:
                pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (when supported) and on CPUs with bf16 matrix units; fp32 elsewhere (MPS included)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16_matmul():
        return torch.bfloat16
    return torch.float32


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None
    """How the base is quantized (e.g. "4-bit NF4 + double quantization"), None when it is not."""

    def describe(self) -> str:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__
        params = count_parameters(self.model)
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params:,}"
        how = self.quantization or str(self.dtype).removeprefix("torch.")
        return f"base model {name}: {size} parameters, {how} on {self.device}"


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters as the model defines them: a 4-bit layer counts in x out, not its packed storage."""
    total, seen = 0, set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            packed = type(param).__name__ == "Params4bit" and hasattr(module, "in_features")
            total += module.in_features * module.out_features if packed else param.numel()
    return total


def load_tokenizer(config: ModelConfig):
    """The tokenizer of `config.name_or_path` (no weights load), with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer

    source, extra = _pretrained_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_options(config), **extra)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot load {source!r}: {err}", where="run config") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions carry no loss; any real token will do
    return tokenizer


def _pretrained_source(config: ModelConfig) -> tuple[str, dict]:
    """(source, extra from_pretrained options) for the tokenizer and the config: a GGUF base is read straight
    from its file (transformers' reading, no weights), anything else from its directory or hub id."""
    gguf = gguf_file_of(config)
    if gguf is None:
        return _checked_source(config), {}
    return str(gguf.path.parent), {"gguf_file": gguf.path.name}


_GGUF_READ: dict[tuple, object] = {}


def gguf_file_of(config: ModelConfig):
    """The GgufFile of a GGUF base (header read and hashed once per process and file version), else None."""
    from . import gguf_base

    if not gguf_base.is_gguf(config.name_or_path, config.gguf_file):
        return None
    path = gguf_base.locate(config.name_or_path, config.gguf_file, revision=config.revision)
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_READ:
        _GGUF_READ[key] = gguf_base.read_gguf(path)
    return _GGUF_READ[key]


def _checked_source(config: ModelConfig) -> str:
    source = config.name_or_path
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {source!r} is not a model directory (no config.json there); "
            "give a directory saved with save_pretrained, or a hub id such as 'Qwen/Qwen2.5-0.5B'",
            where="run config",
        )
    return source


def _hub_options(config: ModelConfig) -> dict:
    return dict(trust_remote_code=config.trust_remote_code, revision=config.revision)


def load_base_model(config: ModelConfig, *, log=lambda _: None, shard_over=None) -> LoadedModel:
    """Load model and tokenizer as `config` says; errors name the field and what to change.

    With `config.quantization` the linear layers are loaded in 4 or 8 bits (see lorakit.quant); `log`
    receives notes about how that was done. `shard_over` (a Torchrun, for fsdp): the decoder layers are
    loaded straight into this process's FSDP shards where the checkpoint allows (train/sharded_load.py).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(config)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    source = config.name_or_path
    options = _hub_options(config)
    gguf = gguf_file_of(config)
    if gguf is not None:  # its weights dequantized once into a cached directory, which loads like any other
        from .gguf_base import dequantized

        source = str(dequantized(gguf, dtype, log=log))
        options = dict(options, revision=None)
    spec = quant_spec(config, dtype, device)
    try:
        if spec is not None:
            from .quant import load_quantized

            model = load_quantized(source, spec, device=device, log=log,
                                   options=dict(options, attn_implementation=config.attn_implementation))
        else:
            model = None if shard_over is None else _load_into_shards(source, dtype, device, shard_over, options,
                                                                      config, log)
            if model is None:  # not fsdp, or a checkpoint that cannot be loaded into shards
                model = AutoModelForCausalLM.from_pretrained(
                    source, dtype=dtype, attn_implementation=config.attn_implementation, **options)
                model.to(device)
                _prepare_quantized_on_disk(model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot load {source!r}: {err}", where="run config") from None
    model.eval()
    if gguf is not None:  # named after the user's file, which the adapters record (lora/io.py BASE_FILE)
        model.config._name_or_path = str(gguf.path)
        model.lorakit_base_file = gguf.provenance()
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=spec.compute_dtype if spec else dtype,
                       quantization=spec.describe() if spec else None)


def _prepare_quantized_on_disk(model: torch.nn.Module) -> None:
    """A checkpoint quantized on disk (its config.json has a quantization_config) loads as bitsandbytes layers
    even with no model.quantization; mark them for LoRA as lorakit's own quantized loading does."""
    from .quant import prepare_for_lora

    prepare_for_lora(model)  # touches only bitsandbytes layers


def load_model_config(config: ModelConfig):
    """transformers' config of model.name_or_path: config.json of a local directory, or the hub's."""
    from transformers import AutoConfig

    source, extra = _pretrained_source(config)
    try:
        return AutoConfig.from_pretrained(source, **_hub_options(config), **extra)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot read the config of {config.name_or_path!r}: {err}",
                          where="run config") from None


def meta_model(hf_config, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of a transformers config (or a local model directory or GGUF file), built on the meta
    device: the modules and shapes load_base_model builds, with no memory used and no weight read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = hf_config if isinstance(hf_config, (str, Path)) else "the model config"
    try:
        if isinstance(hf_config, (str, Path)) and str(hf_config).lower().endswith(".gguf"):
            from .gguf_base import hf_config_of

            hf_config = hf_config_of(hf_config)
        elif isinstance(hf_config, (str, Path)):
            hf_config = AutoConfig.from_pretrained(hf_config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: transformers cannot build a causal LM from its config.json ({err})",
                          where="base model") from None


def _load_into_shards(source, dtype, device, run, options, config: ModelConfig, log):
    """The model loaded straight into FSDP shards, or None (with a note) when the checkpoint does not allow it."""
    from transformers import AutoConfig

    from .quant.load import checkpoint_files
    from .train.sharded_load import load_into_shards

    model_config = AutoConfig.from_pretrained(source, **options)
    files = checkpoint_files(source, revision=options.get("revision"))
    reason = "it has no .safetensors weights"
    if files is not None:
        model = load_into_shards(source, model_config, files, dtype=dtype, device=device, run=run,
                                 options=dict(options, attn_implementation=config.attn_implementation))
        if not isinstance(model, tuple):
            log(f"fsdp: loaded straight into shards: this process holds 1/{run.world} of each decoder layer")
            return model
        reason = model[1]
    log(f"note: fsdp: loading the whole model in each process before sharding it ({reason})")
    return None


def quant_spec(config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The resolved quantization settings (a lorakit.quant.QuantSpec), or None for a 16/32-bit base."""
    q = config.quantization
    if q is None:
        return None
    if device.type == "mps":
        raise ConfigError("model.quantization: bitsandbytes does not run on Apple MPS; use device cpu, or "
                          "remove the quantization section", where="run config")
    from .quant import QuantSpec

    compute = dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return QuantSpec(bits=q.bits, quant_type=q.type, double_quant=q.double_quant, compute_dtype=compute)
