"""The peak memory of a training run, predicted from the run config and the model's config.json alone.

Weights and adapters are counted exactly from a meta-device build of the model (shape.py). What fit()
holds on top is counted here from the shapes, following what lorakit's step really keeps (train/loop.py,
chunked_loss.py, activation_checkpointing.py, speed.py), for a Llama-style decoder layer:

- per layer, saved for backward (bytes per token; e = bytes per element of the compute dtype): the two
  RMSNorm inputs upcast to fp32 (4h each, none for the first trained layer, whose input needs no gradient);
  SDPA's query, key, value and output (e(2q + 2kv); with grouped-query heads and a mask, transformers repeats
  K and V to q each); its log-sum-exp (4 per head); the gated MLP's gate output, its SiLU and the up output
  (3ei). Frozen linear layers save nothing for themselves; a LoRA target saves its input (once per group of
  targets reading the same tensor: q/k/v, gate/up; o_proj's input is SDPA's output, already counted) and
  its (tokens, r) down-projection, and with speed.adapter_compute auto the 16-bit copies of A and B.
- gradient checkpointing: a checkpointed layer keeps only its input (eh) until one recomputation at a time.
- backward working set: one layer's gradients in flight, e(3i + 2h) per token.
- the loss: chunked (frozen lm_head, train.loss_chunk_tokens c): the hidden-state gradient eh per supervised
  token is kept, and a chunk of logits, their fp32 copy, log-softmax and 16-bit probabilities exist at once
  (10 c V bytes for one 16-bit chunk, 14 c V when a second chunk starts while the first is still referenced);
  full logits: the fp32 log-softmax (4 n V) is kept for backward, whose cross-entropy gradient peaks at
  12 n V. n = batch x (max_seq_len - 1): every position supervised, the worst case (chat data masks prompts);
  preference objectives score completion tokens only, at most preference.max_completion_len per row.
- LoRA: weights, gradients and AdamW's two moments, in the adapter dtype.

On the CPU the number predicted is the peak resident set (VmHWM) of the `lorakit train` process: the
Python + torch runtime (measured, see check.runtime_bytes), the weights, and the above as glibc malloc
holds it: buffers under its mmap threshold come from a heap that keeps, fragmented, what a step frees, so the
heap's resident size is CPU_HEAP_FACTOR times the live peak of those buffers (measured); larger buffers (the
logit chunks) are mapped while they live and come on top. On CUDA: the live tensors' peak plus the context.
Measured accuracy: bench/plan_accuracy.py and bench/README.md; tests/plan/test_plan.py checks it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .shape import ModelShape

MiB = 2**20
CPU_HEAP_FACTOR = 2.1
"""Resident heap / live peak of the buffers glibc serves from its heap, from step 2 on (step 1 leaves the heap
less fragmented): 2.0-2.2 fits the 13 runs of bench/plan_accuracy.py (40M, 150M, 7B shapes) best."""
GLIBC_MMAP_MAX = 32 * MiB  # glibc's largest dynamic mmap threshold (64-bit): bigger buffers are always mapped
LEAN_MMAP = 4 * MiB  # lorakit.quant.load.lean_allocator's threshold, set when the base is quantized
HEAP_MIXING = 0.1
"""Below the lean threshold: where at least this fraction of a step's activation bytes are buffers smaller than
the mmap threshold, the larger ones end up in the heap too (served from the free space the smaller ones leave
behind), as measured on the 150M shape in 4 bits; the 7B shape in 4 bits, whose buffers are nearly all larger,
keeps them mapped."""
CUDA_ALLOCATOR_SLACK = 0.05  # the caching allocator's rounding and fragmentation, reserved over allocated


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Setup:
    """The run settings the estimate depends on (resolved from RunConfig and the machine)."""

    device: str  # "cpu", "cuda" or "mps" (estimated like cuda: live tensors, no glibc heap)
    dtype: torch.dtype
    bits: int | None
    double_quant: bool
    adapter_bytes: int
    base_dtype_lora: bool  # speed.adapter_compute auto: 16-bit copies of A and B per step
    batch_size: int
    seq_len: int
    checkpointing: bool
    checkpoint_every: int
    loss_chunk: int | None
    packing: bool
    eager_attention: bool
    runtime: int
    """The framework's own bytes (CPU: resident runtime; CUDA: the context), measured by check.py."""
    scored_per_row: int | None = None
    """At most this many tokens of a row are scored (preference.max_completion_len); None: every position."""
    frozen_adapter: bool = False
    """A frozen copy of the trained adapter is held too (preference.reference.adapter): its weights only."""


@dataclass
class MemoryPlan:
    setup: Setup
    items: list[Item]
    peak: int
    phase: str
    """Where the peak falls: "loss" (end of the forward pass), "backward", or "loading"."""
    notes: list[str]

    def item(self, name: str) -> int:
        return next(i.bytes for i in self.items if i.name == name)


# ---- the arithmetic -----------------------------------------------------------------------------------
def estimate(shape: ModelShape, setup: Setup) -> MemoryPlan:
    """The predicted peak of a training step for `setup` (pure arithmetic: cheap to call in a search)."""
    s = setup
    e = s.dtype.itemsize
    h, i, V = shape.hidden, shape.intermediate, shape.vocab
    T = s.batch_size * s.seq_len
    n = s.batch_size * max(min(s.seq_len - 1, s.scored_per_row or s.seq_len), 1)  # supervised positions, at most
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    masked = s.packing or s.batch_size > 1  # padded or packed rows get a (batch, 1, seq, seq) mask
    kv = q_dim if (shape.kv_heads != shape.heads and masked) else kv_dim  # transformers repeats K, V then

    def layer(index: int) -> Counter:
        """The tensors one trained decoder layer keeps for backward: {bytes: how many} (module docstring)."""
        kept = _tensors((4 * h * T, 2), (4 * T, 2), (e * q_dim * T, 2), (e * kv * T, 2), (4 * shape.heads * T, 1),
                        (e * i * T, 3))
        if index == shape.first_trained_layer:  # its input needs no gradient: the first norm keeps nothing
            kept.subtract({4 * h * T: 1, 4 * T: 1})
        for features in shape.lora_inputs[index]:
            kept[e * features * T] += 1
        rank, params, tensors = shape.lora_layers[index]
        if rank:
            kept[e * rank * T] += 1
        if s.base_dtype_lora and s.adapter_bytes != e and tensors:  # A and B cast to the base dtype, kept
            kept[e * params // tensors] += tensors
        if s.eager_attention:  # the (heads, seq, seq) probabilities, before and after dropout
            kept[e * shape.heads * s.seq_len * T] += 2
        return +kept

    activations, recompute, checkpointed = Counter(), Counter(), 0
    for index in range(shape.first_trained_layer, shape.layers):
        if s.checkpointing and index % s.checkpoint_every == 0:  # only its input, until recomputed
            activations[e * h * T] += 1
            recompute = max(recompute, layer(index), key=_total)
            checkpointed += 1
        else:
            activations += layer(index)
    activations += _tensors((4 * h * T, 1), (4 * T, 1))  # the final norm
    if masked:
        activations[e * T * s.seq_len] += 1
    working = _tensors((e * i * T, 3), (e * h * T, 2))  # one layer's gradients in flight
    if s.bits is not None:  # the weight one quantized matmul dequantizes, and its fp32 scales on the way
        working[shape.largest_weight * e] += 1

    # the loss: what it keeps for backward, its transient buffers in the forward and in the backward
    chunk = s.loss_chunk if (s.loss_chunk is not None and shape.chunked_head) else None
    if chunk is not None:
        c = min(chunk, n)
        rest = min(chunk, n - c)  # a second chunk, made while the first's logits and probabilities live
        kept = _tensors((e * h * n, 1), (T, 1))  # the hidden states' gradient, the supervised-position mask
        transient = _tensors((e * h * n, 1), (4 * c * V, 2))  # the gathered hidden states; logits, log-softmax
        if e != 4 and 10 * c >= 8 * c + (e + 4) * rest:
            transient[e * c * V] += 1  # the 16-bit probabilities
        elif rest:
            transient += _tensors((e * rest * V, 1 if e != 4 else 0), (4 * rest * V, 1))
        backward = Counter()
        loss_note = f"chunked, {chunk} tokens at a time"
    else:
        kept = _tensors((4 * n * V, 1))  # the fp32 log-softmax
        transient = _tensors((4 * n * V, 2 if e == 4 else 1))  # the fp32 logits (+ a contiguous copy when fp32)
        backward = _tensors((4 * n * V, 2))  # the cross-entropy's gradient and the log-softmax's
        loss_note = "full logits" + ("" if s.loss_chunk is None else " (this model's head cannot be chunked)")
    pieces = max(shape.lora_tensors, 1)
    copies = 5 if s.frozen_adapter else 4  # weights, gradients, AdamW's two moments (+ the frozen reference)
    lora_state = _tensors((shape.lora_bytes // pieces, copies * pieces))

    forward_set = activations + kept + transient
    backward_set = activations + kept + working + recompute + backward
    weights = shape.weight_bytes(e, s.bits, s.double_quant)
    if s.device == "cpu":
        # glibc: a buffer of at least the mmap threshold is mapped, and unmapped when freed; smaller ones come
        # from a heap that keeps what it served, fragmented (CPU_HEAP_FACTOR). Bigger ones reuse free heap.
        threshold = LEAN_MMAP if s.bits is not None else GLIBC_MMAP_MAX
        churn = activations + working + recompute
        if _total(churn, below=threshold) >= HEAP_MIXING * _total(churn, below=GLIBC_MMAP_MAX):
            threshold = GLIBC_MMAP_MAX  # the larger buffers reuse the free heap the smaller ones' churn leaves
        heap_live = max(_total(forward_set, below=threshold), _total(backward_set, below=threshold))
        heap_live += _total(lora_state, below=threshold)
        mapped = max(_total(forward_set) - _total(forward_set, below=threshold),
                     _total(backward_set) - _total(backward_set, below=threshold))
        mapped += _total(lora_state) - _total(lora_state, below=threshold)
        heap = int(CPU_HEAP_FACTOR * heap_live)
        peak = s.runtime + weights + heap + mapped
        slack = peak - s.runtime - weights - heap_live - mapped
        at_loss = _total(transient) >= _total(working + recompute + backward)
    else:
        live = max(_total(forward_set), _total(backward_set)) + _total(lora_state)
        slack = int(CUDA_ALLOCATOR_SLACK * (live + weights))
        peak = s.runtime + weights + live + slack
        at_loss = _total(forward_set) >= _total(backward_set)
    phase = "loss" if at_loss else "backward"
    in_peak = s.device == "cpu" or not at_loss  # the CPU heap keeps the backward set of the step before
    work = _total(working + recompute)
    items = [
        Item("framework runtime", s.runtime, "measured: Python, torch, transformers, tokenizer"
             + ("" if s.device == "cpu" else ", CUDA context")),
        Item("base weights", weights, _weights_note(shape, s)),
        Item("LoRA weights + grads + AdamW", _total(lora_state), f"{shape.lora_params:,} trainable, {copies} copies"
             + (" (one the frozen reference)" if s.frozen_adapter else "")),
        Item("activations", _total(activations), _activation_note(s, checkpointed, shape.layers, masked)),
        Item("backward working set", work if in_peak else 0,
             ("one layer's gradients" + (" + one recomputed layer" if recompute else "")
              + (" + one dequantized weight" if s.bits else "")) if in_peak else "not at the peak"),
        Item("allocator slack", slack, f"glibc heap x{CPU_HEAP_FACTOR} (measured)" if s.device == "cpu"
             else f"caching allocator, +{CUDA_ALLOCATOR_SLACK:.0%}"),
    ]
    # what the peak holds beyond the items above is the loss's: what it keeps, and its transient buffers
    items.insert(5, Item("logits + loss", peak - sum(item.bytes for item in items), loss_note))
    if s.bits is not None:  # the streaming loader: one checkpoint tensor read, cast and packed at a time
        load = s.runtime + weights + 3 * shape.checkpoint_element * shape.largest_weight
    else:  # from_pretrained memory-maps the checkpoint; a dtype cast reads all of it while making the copies
        params = shape.quantizable[0] + shape.other_params + shape.fp32_params
        load = s.runtime + weights + (params * shape.checkpoint_element if shape.checkpoint_element != e else 0)
    notes = list(shape.notes)
    if load > peak:
        notes.append(f"loading peaks above training ({peak / 1e9:.2f} GB): the checkpoint's pages stay mapped while "
                     f"its weights are cast to {str(s.dtype).removeprefix('torch.')}")
        peak, phase = load, "loading"
    return MemoryPlan(setup=s, items=items, peak=peak, phase=phase, notes=notes)


def _tensors(*pairs: tuple[int, int]) -> Counter:
    """{bytes: how many} from (bytes, how many) pairs; equal sizes add up."""
    out = Counter()
    for size, count in pairs:
        out[size] += count
    return out


def _total(tensors: Counter, below: int | None = None) -> int:
    """Bytes of {bytes: count}; with `below`, only of the tensors smaller than that."""
    return sum(size * count for size, count in tensors.items() if below is None or size < below)


def _weights_note(shape: ModelShape, s: Setup) -> str:
    dtype = str(s.dtype).removeprefix("torch.")
    if s.bits is None:
        return dtype
    return f"{s.bits}-bit linear layers ({shape.quantizable[0] / 1e6:.0f}M weights), the rest {dtype}"


def _activation_note(s: Setup, checkpointed: int, layers: int, masked: bool) -> str:
    what = f"{s.batch_size} x {s.seq_len} tokens"
    if checkpointed:
        what += f", checkpointing {checkpointed} of {layers} layers"
    if masked:
        what += ", (batch, 1, seq, seq) mask"
    return what
