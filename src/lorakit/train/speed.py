"""The speed section of a run: what fit() turns on for a faster step, and how it is undone afterwards.

Measured on a Llama-shaped 150M model with a bf16 base (bench/train_speed.py, bench/README.md):
- adapter_compute: LoRA's matmuls in the base's dtype. A fp32 adapter on a bf16 base otherwise casts every
  layer's input up to fp32 and its (tokens, out) update back down; casting the two small weights instead
  removes those copies.
- compile: torch.compile of each decoder layer (norms, rotary embedding, SiLU gating, residual adds and casts
  fused into a few kernels; the matmuls and attention stay library calls) and of the loss's softmax.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..config import SpeedConfig
from ..errors import ConfigError
from ..lora import LoraModel
from ..lora.inject import is_quantized_linear
from .activation_checkpointing import decoder_layers
from .compile_cache import is_warm, layer_signature, mark_warm, use_persistent_cache

COMPILE_MIN_STEPS = 300
COMPILE_MIN_STEPS_WARM = 50
COMPILE_MIN_PARAMS = 20_000_000
"""compile: auto compiles runs of at least COMPILE_MIN_STEPS optimizer steps on a model of at least
COMPILE_MIN_PARAMS parameters. Compiling takes 30-60 s here; it saves ~0.2 s a step on a 40M model and
~0.5 s on a 150M one (bench/README.md), but on the quickstart's 1.4M model 1000 steps are not enough to earn it
back (113 s against 82 s uncompiled). Once a run has compiled layers of the same signature (compile_cache.py),
inductor's cache answers and compiling costs ~6 s (bench/compile_cache.py, 40M: break-even after 18 steps):
auto then compiles runs of at least COMPILE_MIN_STEPS_WARM steps, leaving room for smaller models and a
sequence length the cache has not seen (its graph compiles afresh)."""
WARM_AFTER_STEPS = 2
"""A run marks its layers' signature warm once this many steps ran compiled: the first step compiles the
forward and backward graphs, the second a sequence length of its own (dynamic shapes from then on)."""


@dataclass
class SpeedSetup:
    """What setup_speed turned on (and why not, for what it left off); undo() restores the model."""

    compiled: bool = False
    adapter_compute_in_base_dtype: bool = False
    notes: list[str] = field(default_factory=list)
    signature: str | None = None  # of the compiled decoder layers (compile_cache.layer_signature)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self, steps_trained: int = 0) -> None:
        """Restore the model; a compiled run that trained `steps_trained` steps marks its layers' compiled
        graphs as cached for the next run."""
        if self.signature is not None and steps_trained >= WARM_AFTER_STEPS:
            mark_warm(self.signature)
        while self._undo:
            self._undo.pop()()


def setup_speed(model: nn.Module, speed: SpeedConfig, *, total_steps: int, checkpointing: bool) -> SpeedSetup:
    """Apply `speed` to `model` (a LoraModel, or any module) for a run of `total_steps` optimizer steps."""
    setup = SpeedSetup()
    if isinstance(model, LoraModel) and speed.adapter_compute == "auto":
        model.compute_adapters_in_base_dtype(True)
        setup.adapter_compute_in_base_dtype = True
        setup._undo.append(lambda: model.compute_adapters_in_base_dtype(False))
    if speed.compile == "off":
        return setup
    base = getattr(model, "model", model)
    layers = decoder_layers(base)
    device = _device_type(model)
    reasons = compile_obstacles(model, layers, device, checkpointing)
    if speed.compile == "on" and reasons:
        raise ConfigError(f"speed.compile: on, but this run cannot be compiled: {'; '.join(reasons)}. "
                          "Set speed.compile: auto (compile where it can) or off.", where="run config")
    signature = layer_signature(layers[0]) if layers else None
    warm = signature is not None and is_warm(signature)
    if speed.compile == "auto":
        size = sum(p.numel() for p in model.parameters())
        min_steps = COMPILE_MIN_STEPS_WARM if warm else COMPILE_MIN_STEPS
        if size < COMPILE_MIN_PARAMS:
            reasons.append(f"the model has {size / 1e6:.1f}M parameters, too few for compiling to pay off "
                           f"(auto compiles from {COMPILE_MIN_PARAMS / 1e6:.0f}M; speed.compile: on forces it)")
        elif total_steps < min_steps:
            repay = ("repay compiling from inductor's cache" if warm else "repay a first compile "
                     f"({COMPILE_MIN_STEPS_WARM} once a run of these layers has compiled them into inductor's cache)")
            reasons.append(f"the run has {total_steps} steps, fewer than the {min_steps} that {repay}; "
                           "speed.compile: on forces it")
        if reasons:
            setup.notes.append("speed: not compiling: " + "; ".join(reasons))
            return setup
    if speed.compile == "auto":
        # auto must never fail a run that would train uncompiled: a graph torch.compile cannot handle runs
        # eagerly instead (torch logs a warning), where compile: on lets the error through.
        import torch._dynamo.config as dynamo_config

        previous = dynamo_config.suppress_errors
        dynamo_config.suppress_errors = True
        setup._undo.append(lambda: setattr(dynamo_config, "suppress_errors", previous))
    cache = use_persistent_cache()
    for layer in layers:
        layer.compile()
        setup._undo.append(lambda layer=layer: setattr(layer, "_compiled_call_impl", None))
    setup.compiled, setup.signature = True, signature
    how = ("inductor's cache holds these layers: seconds" if warm else
           "the first steps are slow while it compiles; a later run of these layers takes seconds")
    setup.notes.append(f"speed: compiling {len(layers)} decoder layers and the loss with torch.compile "
                       f"({how}; cache: {cache})")
    return setup


def compile_obstacles(model: nn.Module, layers: list[nn.Module], device: str, checkpointing: bool) -> list[str]:
    """Why this model cannot be compiled here (empty: it can)."""
    reasons = []
    if not layers:
        reasons.append(f"{type(getattr(model, 'model', model)).__name__} has no decoder layers lorakit can "
                       "find (transformers' GradientCheckpointingLayer)")
    if checkpointing:
        reasons.append("train.gradient_checkpointing is on (compiled layers are not checkpointed)")
    if any(is_quantized_linear(m) for m in model.modules()):
        reasons.append("the base is quantized (bitsandbytes layers are not compiled)")
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in layers):
        reasons.append("the layers are sharded with fsdp (not compiled together here)")
    if device not in ("cpu", "cuda"):
        reasons.append(f"the model is on {device} (compile is used on cpu and cuda only)")
    if device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        reasons.append("no C++ compiler found (torch.compile on CPU builds C++ kernels; install g++)")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed (torch.compile on CUDA generates Triton kernels)")
    return reasons


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"
