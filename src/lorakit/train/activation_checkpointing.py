"""Gradient (activation) checkpointing of a transformers model's decoder layers, all or every k-th one.

A checkpointed layer keeps only its input in the forward and recomputes its activations in the backward.
Recomputing every layer costs about one extra forward; recomputing every k-th layer keeps the activations
of the others, trading memory back for speed where the memory freed by full checkpointing goes unused.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's checkpointable blocks in module order: transformers' GradientCheckpointingLayer instances,
    whose forward checkpoints itself while `layer.gradient_checkpointing` is true in training with grad on."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: layers checkpointed from the model's own loop
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: nn.Module, every: int = 1) -> Callable[[], None]:
    """Turn on non-reentrant checkpointing of `model` (a transformers model), then leave it on only on the
    layers whose index is a multiple of `every`. Returns the function that turns it all off again."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError("train.gradient_checkpointing: this model does not support gradient checkpointing; "
                          "set it to false", where="train config")
    layers = decoder_layers(model)
    if every > 1 and not layers:
        raise ConfigError(f"train.checkpoint_every: {every} needs decoder layers that checkpoint one by one "
                          f"(transformers' GradientCheckpointingLayer), and {type(model).__name__} has none; "
                          "set it to 1 to checkpoint every layer", where="train config")
    input_grads_hook = getattr(model, "_require_grads_hook", None)
    # Non-reentrant: grads reach the LoRA weights even though the frozen embeddings' outputs do not require
    # grad, so no enable_input_require_grads() is needed (transformers 5 adds that hook anyway).
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 name; the old one warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    added_input_grads = getattr(model, "_require_grads_hook", None) is not input_grads_hook

    def disable() -> None:
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
        if added_input_grads and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()  # the hook enabling added; one the caller had set stays

    return disable
