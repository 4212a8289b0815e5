"""The memory plan applied to a run: the machine's side (runtime, memory available, matmul rate), the budget
search, the table, and the check `lorakit train` makes before loading the model.

The framework's runtime is measured, not guessed: on the CPU it is this process's resident size once torch,
transformers and the model's code are imported (planning imports them), plus what a training process adds
beyond that whatever the model (tokenizer, autograd and oneDNN state, the plot at the end): RUNTIME_EXTRA_CPU,
measured as the peak of `lorakit train` on a 2-layer, 32-wide model minus that resident size
(bench/plan_accuracy.py prints both; tests/plan/test_plan.py checks it).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable

import torch

from ..base_model import pick_device, pick_dtype, quant_spec
from ..config import RunConfig, as_trained
from ..data import detect_format, read_records
from ..errors import ConfigError
from ..train.speed import COMPILE_MIN_STEPS
from .estimate import MiB, MemoryPlan, Setup, estimate
from .shape import ModelShape, model_shape

RUNTIME_EXTRA_CPU = 60 * MiB
"""Peak of a tiny `lorakit train` minus this process's RSS after planning (2026-11-29, torch 2.13 CPU)."""
RUNTIME_EXTRA_QUANT = 42 * MiB
"""What importing bitsandbytes and its CPU kernels adds to a quantized run (measured the same way)."""
STEP_EFFICIENCY = 0.25
"""Model FLOPs per second of a LoRA step over the device's matmul rate: 0.25 measured for lorakit's bf16 step
on the 150M preset on CPU (bench/README.md, train_speed.py: MFU 25.1%); used for a rough time per step."""
SEQ_LADDER = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass
class RunPlan:
    """A run's memory plan with what produced it, so other batch shapes can be estimated cheaply."""

    shape: ModelShape
    setup: Setup
    memory: MemoryPlan
    rows_per_example: int = 1
    """Rows a micro-batch holds per train.batch_size: one per task with `tasks:`; two (chosen and rejected) for
    dpo and orpo."""

    def at(self, batch_size: int, seq_len: int, **changes) -> MemoryPlan:
        """The plan at train.batch_size `batch_size` and max_seq_len `seq_len` (and other Setup changes)."""
        rows = batch_size * self.rows_per_example
        return estimate(self.shape, dataclasses.replace(self.setup, batch_size=rows, seq_len=seq_len, **changes))


def plan_run(config: RunConfig, *, hf_config=None) -> RunPlan:
    """The memory plan of `config` on this machine (no weights are loaded)."""
    config = as_trained(config)  # reference.adapter: the starting adapter's shape, not the lora section's
    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    spec = quant_spec(config.model, dtype, device)
    dtype = spec.compute_dtype if spec is not None else dtype
    q = config.model.quantization
    shape = model_shape(config, dtype, hf_config)
    t = config.train
    tasks = len(config.tasks) or 1
    pairs = config.objective in ("dpo", "orpo")
    if config.speed.compile == "on" or (config.speed.compile == "auto" and q is None and not t.gradient_checkpointing
                                        and (t.max_steps or 0) >= COMPILE_MIN_STEPS):
        shape.notes.append("speed.compile may compile the decoder layers, which then keep less than counted here")
    if tasks > 1:
        shape.notes.append(f"{tasks} tasks: each micro-batch holds train.batch_size rows of each, "
                           f"{t.batch_size * tasks} rows")
    if pairs:
        shape.notes.append(f"{config.objective}: each micro-batch holds a chosen and a rejected row per pair, "
                           f"{t.batch_size * 2} rows")
    if config.objective in ("dpo", "kto"):
        shape.notes.append("the reference pass runs under no_grad before the policy's (adapters disabled, or a frozen "
                           "adapter, on the same weights), so it adds no saved activations")
    frozen_copy = config.objective in ("dpo", "kto") and config.preference.reference.adapter is not None
    if frozen_copy:
        shape.notes.append(f"the policy starts from {config.preference.reference.adapter} (its r and targets are "
                           "planned here, not the lora section's); its frozen copy, the reference, is counted")
    if config.objective == "grpo":
        shape.notes.append(f"grpo: each micro-batch holds rl.num_generations completions per prompt, "
                           f"{t.batch_size * config.rl.num_generations} rows; the engine's KV cache for the rollout "
                           "is freed before the training forward and is not counted")
    rows = tasks * (2 if pairs else config.rl.num_generations if config.objective == "grpo" else 1)
    setup = Setup(device=device.type, dtype=dtype, bits=q.bits if q else None,
                  double_quant=q.double_quant if q else True,
                  adapter_bytes=2 if config.model.adapter_dtype == "bfloat16" else 4,
                  base_dtype_lora=config.speed.adapter_compute == "auto", batch_size=t.batch_size * rows,
                  seq_len=config.data.max_seq_len, checkpointing=t.gradient_checkpointing,
                  checkpoint_every=t.checkpoint_every, loss_chunk=t.loss_chunk_tokens, packing=_packing(config),
                  eager_attention=config.model.attn_implementation == "eager",
                  runtime=runtime_bytes(device, quantized=q is not None), frozen_adapter=frozen_copy,
                  scored_per_row=config.preference.max_completion_len if config.objective in ("dpo", "orpo", "kto")
                  else config.rl.max_completion_len if config.objective == "grpo" else None)
    return RunPlan(shape, setup, estimate(shape, setup), rows)


def _packing(config: RunConfig) -> bool:
    """data.packing, with None resolved as prepare() does: on for text records (the first record tells)."""
    if config.data.packing is not None:
        return config.data.packing
    if config.data.format != "auto":
        return config.data.format == "text"
    try:
        first = next(r for r in read_records(config.data.train or config.tasks[0].train) if r.data is not None)
        return detect_format(first.data, config.data.columns) == "text"
    except Exception:  # a hub dataset, an unreadable file: prepare() will say; assume packed (the larger)
        return True


# ---- the machine --------------------------------------------------------------------------------------
def process_status(key: str = "VmRSS") -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, ...); 0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def runtime_bytes(device: torch.device, *, quantized: bool = False) -> int:
    """CPU: this process's resident size now plus the measured extra of a training process. CUDA: the
    memory in use on the device that is not this process's tensors (its context, and other processes')."""
    if device.type == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        return total - free - torch.cuda.memory_reserved(device)
    return process_status("VmRSS") + RUNTIME_EXTRA_CPU + (RUNTIME_EXTRA_QUANT if quantized else 0)


def available_bytes(setup: Setup) -> tuple[int | None, str]:
    """Memory the run may use at its peak, and where the number comes from (None: unknown here). CPU:
    MemAvailable plus this process's resident size (the runtime counted in the plan), within a cgroup limit."""
    if setup.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() + setup.runtime, "free GPU memory (torch.cuda.mem_get_info)"
    meminfo = _meminfo()
    if setup.device != "cpu" or "MemAvailable" not in meminfo:  # Apple MPS, no /proc
        return None, "unknown on this machine"
    own = process_status("VmRSS")
    have, where = meminfo["MemAvailable"] + own, "MemAvailable (/proc/meminfo)"
    limit = _cgroup_room()
    if limit is not None and limit + own < have:
        have, where = limit + own, "the cgroup memory limit"
    return have, where


def _meminfo() -> dict[str, int]:
    try:
        return {k: int(v.split()[0]) * 1024 for k, _, v in
                (line.partition(":") for line in Path("/proc/meminfo").read_text().splitlines()) if v.strip()}
    except (OSError, ValueError):
        return {}


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def matmul_rate(setup: Setup, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in the compute dtype on the run's device, timed for about `seconds`."""
    device = setup.device
    n = 2048 if device == "cpu" else 8192  # bench/train_speed.py measures the CPU's peak at 2048 too
    sync = {"cuda": getattr(torch.cuda, "synchronize", None), "mps": getattr(torch.mps, "synchronize", None)}.get(device)
    a = torch.randn(n, n, dtype=setup.dtype, device=device)
    b = torch.randn(n, n, dtype=setup.dtype, device=device)
    out = torch.empty(n, n, dtype=setup.dtype, device=device)  # reused: no page faults of a fresh output
    for _ in range(2):  # warm-up: kernel selection, AMX tile setup
        torch.mm(a, b, out=out)
    if sync:
        sync()
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        runs += 1
        if sync:
            sync()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def step_flops(plan: RunPlan) -> float:
    """Model FLOPs of one micro-batch: forward 2 T P, backward 2 T P (input gradients of frozen weights) + 4 T P
    for the LoRA weights, causal attention 2 x 2 s^2 h per row and layer forward and twice that backward,
    the head 2 n V h twice; checkpointing adds one forward of the checkpointed layers."""
    shape, s = plan.shape, plan.setup
    tokens, n = s.batch_size * s.seq_len, s.batch_size * max(s.seq_len - 1, 1)
    h, i = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = h * (2 * q_dim + 2 * kv_dim) + 3 * h * i
    layers = 2 * tokens * per_layer * shape.layers
    attention = 4 * s.batch_size * s.seq_len**2 * q_dim * shape.layers
    recompute = (layers + attention) / 2 if s.checkpointing else 0
    return 2 * layers + 3 * attention + recompute + 6 * tokens * shape.lora_params + 4 * n * shape.vocab * h


# ---- the budget search -------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'8GB', '7.5GiB', '512MB', '8e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--budget {text!r}: give a size such as 8GB, 7.5GiB or 512MB", where="lorakit plan")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale)


def largest_batch(plan: RunPlan, seq_len: int, budget: int, limit: int = 1 << 16) -> int:
    """The largest batch_size whose predicted peak at `seq_len` is within `budget` (0: not even 1)."""
    if plan.at(1, seq_len).peak > budget:
        return 0
    low, high = 1, 2
    while high <= limit and plan.at(high, seq_len).peak <= budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if plan.at(mid, seq_len).peak <= budget else (low, mid)
    return low


def budget_table(plan: RunPlan, budget: int) -> list[tuple[int, int]]:
    """(seq_len, largest batch_size) for sequence lengths up to the model's context length."""
    longest = max(plan.shape.max_positions or plan.setup.seq_len, plan.setup.seq_len)
    lengths = sorted({s for s in SEQ_LADDER if s <= longest} | {plan.setup.seq_len})
    return [(seq, largest_batch(plan, seq, budget)) for seq in lengths]


def alternatives(plan: RunPlan, budget: int) -> list[str]:
    """Settings that would fit `budget`, each with its predicted peak."""
    s = plan.setup
    out = []
    batch = largest_batch(plan, s.seq_len, budget)
    if 0 < batch < s.batch_size // plan.rows_per_example:
        out.append(f"train.batch_size={batch} (raise train.grad_accum to keep the effective batch): "
                   f"{gb(plan.at(batch, s.seq_len).peak)}")
    if not s.checkpointing:
        peak = plan.at(s.batch_size // plan.rows_per_example, s.seq_len, checkpointing=True, checkpoint_every=1).peak
        if peak <= budget:
            out.append(f"train.gradient_checkpointing=true: {gb(peak)}")
    if s.loss_chunk is None and plan.shape.chunked_head:
        peak = plan.at(s.batch_size // plan.rows_per_example, s.seq_len, loss_chunk=1024).peak
        if peak <= budget:
            out.append(f"train.loss_chunk_tokens=1024: {gb(peak)}")
    if s.bits is None and s.device != "mps":
        peak = plan.at(s.batch_size // plan.rows_per_example, s.seq_len, bits=4, double_quant=True,
                       runtime=s.runtime + RUNTIME_EXTRA_QUANT).peak
        if peak <= budget:
            out.append(f"model.quantization={{bits: 4}} (QLoRA): {gb(peak)}")
    return out


# ---- text ---------------------------------------------------------------------------------------------
def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(plan: MemoryPlan) -> str:
    width = max(len(i.name) for i in plan.items)
    lines = [f"  {i.name:<{width}}  {i.bytes / 1e9:8.3f} GB  {i.note}" for i in plan.items]
    lines.append(f"  {'predicted peak':<{width}}  {plan.peak / 1e9:8.3f} GB  at {plan.phase}"
                 + (" (resident set of the process)" if plan.setup.device == "cpu" else ""))
    return "\n".join(lines + [f"  note: {n}" for n in plan.notes])


def check_before_training(config: RunConfig, log: Callable[[str], None], *, enforce: bool = True) -> RunPlan | None:
    """Log the predicted peak (before the model loads) and refuse a run predicted not to fit the memory
    available, naming settings that would, unless train.memory_check is false. A model the planner cannot
    build on the meta device gets a note, never a refusal."""
    try:
        plan = plan_run(config)
    except ConfigError:
        raise
    except Exception as err:  # the plan is advice: an exotic model must still train
        log(f"note: no memory plan for this model ({type(err).__name__}: {err})")
        return None
    m = plan.memory
    have, where = available_bytes(m.setup)
    log(f"memory plan: predicted peak {gb(m.peak)} ({m.setup.batch_size} x {m.setup.seq_len} tokens, at {m.phase}); "
        + (f"{gb(have)} available ({where})" if have is not None else f"memory available {where}"))
    if enforce and config.train.memory_check and have is not None and m.peak > have:
        fits = alternatives(plan, have)
        raise ConfigError(
            f"train.batch_size x data.max_seq_len = {config.train.batch_size} x {m.setup.seq_len}: the run is "
            f"predicted to need {gb(m.peak)} at its peak, and {gb(have)} is available ({where}):\n" + table(m) + "\n"
            + ("settings predicted to fit: " + "; ".join(fits) if fits else
               "no single change of batch size, checkpointing, loss chunking or 4-bit is predicted to fit")
            + "\n(train.memory_check: false, or lorakit train --force, trains anyway)", where="run config")
    return plan


def plan_report(config: RunConfig, budget: int | None = None) -> tuple[dict, RunPlan]:
    """(`lorakit plan --json`'s object, the plan): the predicted peak and its items, the memory available, a rough
    time per step at this device's measured matmul rate, and with `budget` the largest batch per max_seq_len."""
    plan = plan_run(config)
    m, s = plan.memory, plan.memory.setup
    have, where = available_bytes(s)
    rate = matmul_rate(s)
    flops = step_flops(plan) * config.train.grad_accum
    rows = budget_table(plan, budget) if budget is not None else []
    report = {
        "peak_bytes": m.peak, "phase": m.phase, "device": s.device, "dtype": str(s.dtype).removeprefix("torch."),
        "batch_size": s.batch_size, "max_seq_len": s.seq_len, "quantization_bits": s.bits,
        "items": [{"name": i.name, "bytes": i.bytes, "note": i.note} for i in m.items], "notes": m.notes,
        "available_bytes": have, "available_from": where, "fits": None if have is None else m.peak <= have,
        "step_flops": flops, "matmul_flops_per_s": rate, "step_efficiency": STEP_EFFICIENCY,
        "seconds_per_step": flops / (rate * STEP_EFFICIENCY),
        "budget_bytes": budget, "budget": [{"max_seq_len": seq, "batch_size": b} for seq, b in rows]}
    return report, plan
