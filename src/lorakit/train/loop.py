"""The training loop: fit(lora_model, train_data, config, output_dir) -> FitResult.

Reads top to bottom like nanoGPT's train.py (lr, forward, loss, backward, clip, step, zero_grad, log), as one
function with no globals. Around that core: checkpoints with the exact data position, exact resume, the
NaN/inf policy of RELIABILITY.md section 4, evaluation, metrics.jsonl, and plain-callable hooks.

Step numbers are 1-based: step n is the n-th optimizer step, and checkpoint step-n holds the state after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..atomic import write_text_atomic
from ..config import SpeedConfig, TrainConfig
from ..data import LengthGroupedBatchSampler, PreparedData, iter_batches, packed_rows
from ..data.templates import IGNORE_INDEX
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from .checkpoint import checkpoint_lock, save_checkpoint, trainable_parameters
from .checkpointing import enable_checkpointing
from .chunked_loss import lm_loss_sum, split_head
from .distributed import DistributedRun, silent
from .evaluate import EvalResult, eval_result, evaluate, loss_sums, model_device, model_inputs
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, NullMetricsLog, plot_losses
from .fingerprint import MAY_CHANGE, run_fingerprints
from .output_dir import ADAPTER_DIR, TRAINER_STATE, check_output_dir, clear_own_outputs, write_run_file
from .restore import resume as resume_checkpoint
from ..signals import Terminated, sigterm_as_interrupt, sigterm_ignored
from .schedule import build_scheduler
from .speed import setup_speed
from .tasks import TaskSet, adapter_parameters, clip_by_task, supervised_by_task, task_loss_sums

Hook = Callable[[str, dict], None]
MAX_CONSECUTIVE_SKIPS = 3  # RELIABILITY.md section 4: stop after 3 consecutive or 10 total skipped updates
MAX_TOTAL_SKIPS = 10
SPIKE_FACTOR, SPIKE_WINDOW = 10.0, 100  # a loss above 10x the median of the last 100 steps is logged as a spike


@dataclass
class FitResult:
    step: int
    """Optimizer steps done in all (including those before a resume)."""
    epoch: float
    train_loss: float | None
    """Loss of the last step (token-weighted mean over its accumulation window)."""
    eval_loss: float | None
    eval_perplexity: float | None
    best_eval_loss: float | None
    best_step: int | None
    skipped_steps: int
    resumed_from: int | None
    """The checkpoint step this run resumed from, or None."""
    output_dir: Path
    adapter_dir: Path
    losses: list[float] = field(default_factory=list)
    """Per-step train losses of this call (NaN for a skipped step)."""
    summary: str = ""


@dataclass
class _State:
    """What trainer_state.json and each checkpoint's trainer_state hold (all JSON-able)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None
    last_eval_perplexity: float | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0
    empty_windows: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- setup helpers ------------------------------------------------------------------------------------
def build_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only. With LoRA+ (Hayou et al. 2024, section 4) the B matrices get
    their own group at lr x loraplus_lr_ratio; group 0 always holds the rest (A, DoRA magnitudes, heads)."""
    if config.loraplus_lr_ratio is None:
        groups = [{"params": list(params.values()), "lr": config.lr}]
    else:
        is_b = {name: ".lora_B." in name or ".lora_embedding_B." in name for name in params}
        groups = [{"params": [p for n, p in params.items() if not is_b[n]], "lr": config.lr},
                  {"params": [p for n, p in params.items() if is_b[n]], "lr": config.lr * config.loraplus_lr_ratio}]
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def batches_per_epoch(data: PreparedData, batch_size: int, rows: Sequence | None) -> int:
    lengths = [len(r) for r in rows] if rows is not None else [len(e.input_ids) for e in data.examples]
    return len(LengthGroupedBatchSampler(lengths, batch_size))


def total_steps_for(config: TrainConfig, n_batches: int, processes: int = 1) -> int:
    """max_steps, or enough steps for `epochs` epochs (a short last window per epoch counts as a step)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(n_batches / (config.grad_accum * processes))))


def _windows(batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into accumulation windows of `size` (the epoch's last one may be shorter)."""
    while True:
        window = list(itertools.islice(batches, size))
        if not window:
            return
        yield window


def _supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


def _progress(total: int, initial: int):
    """A tqdm bar when tqdm is installed and stderr is a terminal; else None (then we log lines)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, initial=initial, disable=None, dynamic_ncols=True, unit="step")
    if bar.disable:
        bar.close()
        return None
    return bar


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


# ---- the loop -----------------------------------------------------------------------------------------
def fit(lora_model: torch.nn.Module, train_data: PreparedData | TaskSet, config: TrainConfig, output_dir: str | Path, *,
        eval_data: PreparedData | None = None, hooks: Iterable[Hook] = (), log: Callable[[str], None] = print,
        resume: str | None = None, speed: SpeedConfig | None = None,
        distributed: DistributedRun | None = None, overwrite: bool = False, allow_change: Iterable[str] = (),
        settings: dict | None = None) -> FitResult:
    """Train the trainable parameters of `lora_model` on `train_data` as `config` says; write checkpoints,
    metrics.jsonl, trainer_state.json and the final adapter (PEFT layout) under `output_dir`.

    `resume` ("never", "auto" or a checkpoint directory) overrides `config.resume`. `output_dir` must be new or
    empty, or hold the run being resumed (output_dir.py); `overwrite` deletes a previous run's outputs there
    first (and nothing else). A resumed checkpoint must match this run's settings (`settings`: the run config's
    other sections, as fingerprint.run_settings records them; the train section is recorded here), except those
    in fingerprint.MAY_CHANGE and those named in `allow_change`. Hooks are called as
    hook(event, info) with event "step", "eval" or "save". On KeyboardInterrupt (and SIGTERM, raised as one) a
    checkpoint of the last completed step is saved and the interrupt re-raised. Non-finite loss or gradients follow
    `config.nan_policy`; giving up raises TrainingError and leaves the last good checkpoint in place.
    `speed` (default: SpeedConfig()'s fast path) is applied for the run and undone when fit returns.
    `distributed` (from init_distributed, under torchrun): this process trains on its share of each step's
    micro-batches (distributed.py); only rank 0 logs, calls hooks and writes files.
    `train_data` may be a TaskSet (tasks.py): one adapter per task, trained together from mixed batches; each
    task's eval data comes with it (`eval_data` unused) and the adapters are saved to adapter/<task name>/.
    """
    out = Path(output_dir)
    processes = distributed.world if distributed is not None else 1
    main = distributed is None or distributed.is_main
    hooks = tuple(hooks) if main else ()
    if not main:
        log = silent
    resume_from = str(config.resume if resume is None else resume)
    if config.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"nan_policy: {config.nan_policy!r} is not one of stop, skip", where="train config")
    tasks = train_data if isinstance(train_data, TaskSet) else None
    if (tasks.examples if tasks is not None else len(train_data.examples)) == 0:
        raise DataError("no training examples left after preparation")
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    model = lora_model
    device = model_device(model)
    base = getattr(model, "model", model)
    mask_dtype = getattr(base, "dtype", torch.float32)  # the additive packed mask must match the model's dtype
    params = trainable_parameters(model)
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with a LoRA config first")
    rows = packed_rows(train_data) if tasks is None and train_data.packing else None
    eval_rows = packed_rows(eval_data) if eval_data is not None and eval_data.packing else None
    evaluates = eval_data is not None or (tasks is not None and any(t.eval_data for t in tasks.tasks))
    fingerprints = run_fingerprints(train_data, config, processes, settings)
    if tasks is None:
        n_batches = batches_per_epoch(train_data, config.batch_size, rows)
    else:
        n_batches = tasks.batches_per_epoch(config.batch_size)
        owned = adapter_parameters(model, tasks.names, params)
    total_steps = total_steps_for(config, n_batches, processes)
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config.lr_schedule, warmup_steps=config.warmup_steps,
                                total_steps=total_steps)
    max_norm = config.max_grad_norm

    if config.loss_chunk_tokens is not None and split_head(model) is None:
        log("note: train.loss_chunk_tokens has no effect on this model (its logits are not just lm_head of the "
            "last hidden state); the loss is computed from the full logits")
    disable_checkpointing = (enable_checkpointing(base, config.checkpoint_every) if config.gradient_checkpointing
                             else None)
    speed = speed if speed is not None else SpeedConfig()
    if tasks is not None and speed.compile != "off":  # per-row routing reads a ContextVar: a graph break per layer
        log("speed: not compiling: several tasks route rows to their adapters, which torch.compile cannot trace")
        speed = dataclasses.replace(speed, compile="off")
    speed_setup = setup_speed(model, speed, total_steps=total_steps, checkpointing=config.gradient_checkpointing)
    for note in speed_setup.notes:
        log(note)
    was_training = model.training
    model.train()

    state = _State()
    result_losses: list[float] = []
    recent = deque(maxlen=SPIKE_WINDOW)
    last_saved: int | None = None
    last_eval_step: int | None = None
    resumed_from: int | None = None
    started = time.perf_counter()
    metrics: MetricsLog | None = None
    bar = None

    def call_hooks(event: str, info: dict) -> None:
        for hook in hooks:
            hook(event, info)

    def save(why: str) -> Path | None:
        nonlocal last_saved
        if not main:  # rank 0 writes; the others hold the same parameters and optimizer state
            last_saved = state.step
            return None
        for name, p in params.items():
            if not torch.isfinite(p).all():
                raise TrainingError(f"step {state.step}: parameter {name} holds NaN/inf; not saving it, the last "
                                    f"good checkpoint is kept", step=state.step)
        path = save_checkpoint(out, state.step, params, optimizer, scheduler,
                               data_position={"epoch": state.epoch, "batches_done": state.batches_done},
                               trainer_state=state.as_dict(), fingerprints=fingerprints,
                               keep_last=config.keep_checkpoints, best_step=state.best_step)
        last_saved = state.step
        log(f"saved checkpoint {path} ({why})")
        call_hooks("save", {"step": state.step, "path": str(path)})
        return path

    def run_eval() -> EvalResult:
        if tasks is not None:
            return record_eval(eval_tasks())
        batches = iter_batches(eval_data, config.batch_size, seed=config.seed, epoch=0, rows=eval_rows, dtype=mask_dtype)
        if distributed is None:
            result = evaluate(model, batches, loss_chunk_tokens=config.loss_chunk_tokens)
        else:  # each process scores its share; the sums are added up
            everyone = list(batches)
            total, tokens = loss_sums(model, distributed.share(everyone), loss_chunk_tokens=config.loss_chunk_tokens)
            with torch.no_grad():
                for _ in range(distributed.padding(everyone)):  # fsdp: as many forwards as the busiest process
                    lm_loss_sum(model, model_inputs(everyone[0], device), everyone[0]["labels"], config.loss_chunk_tokens)
            total, tokens = distributed.sum([total, tokens])
            result = eval_result(total, int(tokens))
        return record_eval(result)

    def eval_tasks() -> EvalResult:
        """Each task's validation data through its own adapter; the run's result is over all their tokens."""
        total, tokens, parts = 0.0, 0, []
        try:
            for task in tasks.tasks:
                if task.eval_data is None:
                    continue
                model.set_adapter(task.name)
                one = loss_sums(model, iter_batches(task.eval_data, config.batch_size, seed=config.seed, epoch=0,
                                                    dtype=mask_dtype), loss_chunk_tokens=config.loss_chunk_tokens)
                total, tokens = total + one[0], tokens + one[1]
                parts.append(f"{task.name} {eval_result(*one).loss:.4f}")
        finally:
            model.set_adapter(tasks.names)
        log(f"eval at step {state.step} by task: {', '.join(parts)}")
        return eval_result(total, tokens)

    def record_eval(result: EvalResult) -> EvalResult:
        nonlocal last_eval_step
        last_eval_step = state.step
        state.last_eval_loss, state.last_eval_perplexity = result.loss, result.perplexity
        if math.isfinite(result.loss) and (state.best_eval_loss is None or result.loss < state.best_eval_loss):
            state.best_eval_loss, state.best_step = result.loss, state.step
        metrics.write({"step": state.step, "eval_loss": result.loss, "eval_perplexity": result.perplexity,
                       "eval_tokens": result.tokens})
        log(f"eval at step {state.step}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
            f"(best {_fmt(state.best_eval_loss)} at step {state.best_step})")
        call_hooks("eval", {"step": state.step, "eval_loss": result.loss, "eval_perplexity": result.perplexity,
                            "tokens": result.tokens})
        return result

    def last_good_note() -> str:
        return (f"the last good checkpoint (step {last_saved}) is kept in {out}" if last_saved is not None
                else "no checkpoint had been saved yet")

    try:
        with checkpoint_lock(out) if main else contextlib.nullcontext(), sigterm_as_interrupt():
            # ---- the output directory, then resume ----
            found = check_output_dir(out, resume=resume_from, overwrite=overwrite) if main else None
            resumed = None
            if resume_from != "never":
                resumed = resume_checkpoint(out, params, optimizer, scheduler, checkpoint=resume_from,
                                            fingerprints=fingerprints, allow_change=allow_change, may_change=MAY_CHANGE)
                if resumed is None:
                    log(f"resume={resume_from}: no checkpoint in {out}; starting from step 0")
            if resumed is None and main:
                if found.own and (overwrite or found.saved_nothing):
                    why = "overwrite" if overwrite else "the previous start saved nothing"
                    log(f"{why}: deleting the previous run's {', '.join(clear_own_outputs(found))} in {out}")
                write_run_file(out, fingerprints)
            if resumed is not None:
                for change in resumed.changes:
                    log(f"resuming with a changed setting: {change}")
                position = resumed.data_position
                if not (isinstance(position.get("epoch"), int) and isinstance(position.get("batches_done"), int)):
                    raise CheckpointError(f"{resumed.path}: data_position {position!r} lacks epoch/batches_done")
                for key, value in resumed.trainer_state.items():
                    if hasattr(state, key):
                        setattr(state, key, value)
                state.step, state.epoch, state.batches_done = resumed.step, position["epoch"], position["batches_done"]
                resumed_from = last_saved = resumed.step
                log(f"resumed from {resumed.path} at step {resumed.step} "
                    f"(epoch {state.epoch}, batch {state.batches_done} of {n_batches})")
            if distributed is not None:  # resumed or seeded alike, made identical to be sure
                distributed.broadcast_parameters(list(params.values()))
            metrics = MetricsLog(out, keep_until_step=resumed_from) if main else NullMetricsLog()
            examples = tasks.examples if tasks is not None else len(train_data.examples)
            if tasks is not None:
                log(f"tasks: {', '.join(tasks.names)}; each micro-batch holds {config.batch_size} rows of each task, "
                    f"an epoch is one pass over the largest task (smaller ones start their next epoch)")
            log(f"training {examples} examples: {n_batches} batches of {config.batch_size} per epoch, "
                f"grad_accum {config.grad_accum}, {total_steps} steps; {sum(p.numel() for p in params.values()):,} "
                f"trainable parameters")
            if distributed is not None:
                log(f"distributed: {processes} processes ({distributed.backend}); each step takes {processes} x "
                    f"grad_accum {config.grad_accum} micro-batches of {config.batch_size} = a global batch of "
                    f"{processes * config.grad_accum * config.batch_size}")
            bar = _progress(total_steps, state.step) if main else None
            window_rng = None
            try:
                while state.step < total_steps:
                    if state.batches_done >= n_batches:  # epoch finished: the next starts at its first batch
                        state.epoch, state.batches_done = state.epoch + 1, 0
                    step_at_start, fresh_epoch = state.step, state.batches_done == 0
                    # The order is a pure function of (seed, epoch): skipping k batches lands on the exact batch.
                    # Examples are grouped by length only within a step's micro-batches: steps of similar lengths
                    # pad less but train worse (bench/quality.py), so each step is a random sample.
                    step_batches = config.grad_accum * processes
                    if tasks is None:
                        epoch_batches = iter_batches(train_data, config.batch_size, seed=config.seed,
                                                     epoch=state.epoch, rows=rows, dtype=mask_dtype, group=step_batches)
                        epoch_batches = itertools.islice(epoch_batches, state.batches_done, None)
                    else:
                        epoch_batches = tasks.batches(config.batch_size, seed=config.seed, epoch=state.epoch,
                                                      start=state.batches_done, group=step_batches)
                    for window in _windows(epoch_batches, config.grad_accum * processes):
                        # RNG at the window's start: an interrupt mid-window saves this, so the redo draws the same.
                        window_rng = (torch.get_rng_state(), random.getstate())
                        t0 = time.perf_counter()
                        if tasks is None:
                            supervised = sum(_supervised(b) for b in window)
                        else:  # each task's loss is divided by its own supervised tokens, as alone
                            by_task = supervised_by_task(window, tasks.names)
                            supervised = sum(by_task.values())
                            task_sums = dict.fromkeys(tasks.names, 0.0)
                        if supervised == 0:  # no 0/0: a window of prompt-only rows is skipped and counted
                            state.empty_windows += 1
                            state.batches_done += len(window)
                            log(f"warning: step {state.step + 1}: no supervised tokens in the window; skipped")
                            window_rng = None
                            continue

                        # forward + backward; each micro-batch's summed loss is divided by the WINDOW's
                        # supervised tokens, so the gradient is that of the token-weighted mean over the window.
                        # The loss is taken loss_chunk_tokens at a time where the model allows (chunked_loss.py).
                        lr = scheduler.get_last_lr()[0]
                        loss_sum, tokens = 0.0, 0
                        for batch in (distributed.share(window) if distributed is not None else window):
                            if tasks is None:
                                micro_loss, _ = lm_loss_sum(model, model_inputs(batch, device), batch["labels"],
                                                            config.loss_chunk_tokens, compiled=speed_setup.compiled)
                                (micro_loss / supervised).backward()
                            else:
                                sums = task_loss_sums(model, model_inputs(batch, device), batch, tasks.names,
                                                      config.loss_chunk_tokens)
                                sum(sums[n] / by_task[n] for n in sums if by_task[n]).backward()
                                micro_loss = sum(sums.values())
                                for name, value in sums.items():
                                    task_sums[name] += float(value.detach())
                            loss_sum += float(micro_loss.detach())
                            tokens += _tokens(batch)
                        for _ in range(distributed.padding(window) if distributed is not None else 0):
                            # fsdp: every forward and backward gathers weights, so every process runs as many
                            # as the busiest; this one's share was short, so it repeats one with zero weight.
                            filler, _ = lm_loss_sum(model, model_inputs(window[0], device), window[0]["labels"],
                                                    config.loss_chunk_tokens, compiled=speed_setup.compiled)
                            (filler * 0.0).backward()
                        if distributed is not None:  # the window's loss and gradient, as one process would have them
                            by_process = list(task_sums.values()) if tasks is not None else []
                            loss_sum, tokens, *by_process = distributed.sum([loss_sum, tokens, *by_process])
                            tokens = int(tokens)
                            if tasks is not None:
                                task_sums = dict(zip(tasks.names, by_process))
                            distributed.sum_gradients(list(params.values()))
                        loss = loss_sum / supervised

                        # grad norm (before clipping), finiteness check, clip, step
                        if tasks is None:
                            grads = [p.grad for p in params.values() if p.grad is not None]
                            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                        else:  # each adapter clipped by its own norm; a non-finite one skips every task's update
                            norms = clip_by_task(owned, max_norm)
                            grad_norm = math.sqrt(sum(n * n for n in norms.values()))
                        finite = math.isfinite(loss) and math.isfinite(grad_norm)
                        if finite:
                            if max_norm is not None and tasks is None:
                                torch.nn.utils.clip_grads_with_norm_(list(params.values()), max_norm,
                                                                     torch.tensor(grad_norm))
                            optimizer.step()
                            scheduler.step()
                            state.consecutive_skips = 0
                        optimizer.zero_grad(set_to_none=True)
                        state.step += 1
                        state.batches_done += len(window)
                        window_rng = None
                        elapsed = time.perf_counter() - t0
                        epoch_f = state.epoch + state.batches_done / n_batches
                        row = {"step": state.step, "epoch": round(epoch_f, 4), "loss": loss, "lr": lr,
                               "grad_norm": grad_norm, "tokens": tokens,
                               "tokens_per_s": tokens / elapsed if elapsed > 0 else None}
                        if tasks is not None:
                            row["task_loss"] = {n: task_sums[n] / by_task[n] if by_task[n] else None for n in tasks.names}
                            row["task_grad_norm"] = norms
                        result_losses.append(loss)

                        if not finite:  # RELIABILITY.md section 4
                            what = f"loss {loss} / grad norm {grad_norm}"
                            if config.nan_policy == "stop":
                                metrics.write({**row, "skipped": True})
                                raise TrainingError(f"step {state.step}: non-finite {what} (nan_policy=stop); "
                                                    f"stopping; {last_good_note()}", step=state.step)
                            state.skipped_steps += 1
                            state.consecutive_skips += 1
                            metrics.write({**row, "skipped": True})
                            log(f"warning: step {state.step}: non-finite {what}; update skipped "
                                f"({state.consecutive_skips} in a row, {state.skipped_steps} in all)")
                            if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS or state.skipped_steps >= MAX_TOTAL_SKIPS:
                                raise TrainingError(f"step {state.step}: {state.consecutive_skips} consecutive / "
                                                    f"{state.skipped_steps} total skipped updates (limits "
                                                    f"{MAX_CONSECUTIVE_SKIPS} / {MAX_TOTAL_SKIPS}); stopping; "
                                                    f"{last_good_note()}", step=state.step)
                        else:
                            if len(recent) >= 10 and loss > SPIKE_FACTOR * statistics.median(recent):
                                row["spike"] = True
                                log(f"warning: step {state.step}: loss spike {loss:.4f} "
                                    f"(> {SPIKE_FACTOR:g}x the median of the last {len(recent)} steps)")
                            recent.append(loss)
                            metrics.write(row)

                        # log
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s'] or 0:.0f}")
                        elif state.step % config.log_every == 0 or state.step == total_steps:
                            by = "".join(f" | {n} {_fmt(v)}" for n, v in row.get("task_loss", {}).items())
                            log(f"step {state.step}/{total_steps} | epoch {epoch_f:.2f} | loss {loss:.4f}{by} | lr {lr:.2e} "
                                f"| grad_norm {grad_norm:.3f} | {row['tokens_per_s'] or 0:.0f} tok/s")
                        call_hooks("step", {**row, "skipped": not finite})

                        if evaluates and config.eval_every and state.step % config.eval_every == 0:
                            run_eval()
                        if config.save_every and state.step % config.save_every == 0:
                            save(f"every {config.save_every} steps")
                        if state.step >= total_steps:
                            break
                    else:
                        state.batches_done = max(state.batches_done, n_batches)  # epoch exhausted
                        if fresh_epoch and state.step == step_at_start:  # would loop forever
                            raise DataError("no batch of the training data has a supervised token (every label is "
                                            "-100); check the template and train_on_prompt")
            except KeyboardInterrupt as stop:
                # Save where the last completed step left off; a half-done accumulation window is redone on resume
                # (its gradients are dropped and the RNG rewound to the window's start).
                if window_rng is not None:
                    torch.set_rng_state(window_rng[0])
                    random.setstate(window_rng[1])
                optimizer.zero_grad(set_to_none=True)
                if metrics is not None:
                    metrics.close()
                    metrics = None
                why = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
                log(f"{why} at step {state.step}; saving a checkpoint to resume from")
                with sigterm_ignored():
                    path = save("interrupted")
                log(f"resume with resume=auto (or {path})")
                raise

            # ---- the end: last eval, last checkpoint, adapter, trainer state, plot ----
            if evaluates and last_eval_step != state.step:
                run_eval()
            if last_saved != state.step:
                save("end of training")
            adapter_dir = out / ADAPTER_DIR
            final = {**state.as_dict(), "total_steps": total_steps, "epoch_progress": state.epoch + state.batches_done / n_batches,
                     "resumed_from": resumed_from, "adapter": str(adapter_dir), "metrics": METRICS_FILE}
            if main:
                model.save_adapter(adapter_dir)
                write_text_atomic(out / TRAINER_STATE, json.dumps(final, indent=1, allow_nan=False) + "\n")
                if plot_losses(metrics.rows(), out / PLOT_FILE):
                    log(f"loss curve: {out / PLOT_FILE}")
            if distributed is not None:
                distributed.barrier()  # the others return once rank 0's files are complete
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        model.train(was_training)
        speed_setup.undo()
        if disable_checkpointing is not None:
            disable_checkpointing()

    train_loss = next((x for x in reversed(result_losses) if math.isfinite(x)), None)
    seconds = time.perf_counter() - started
    summary = (f"{state.step} steps ({final['epoch_progress']:.2f} epochs) in {seconds:.1f}s; "
               f"last train loss {_fmt(train_loss)}")
    if state.last_eval_loss is not None:
        summary += (f"; eval loss {_fmt(state.last_eval_loss)} (perplexity {_fmt(state.last_eval_perplexity, '.2f')}), "
                    f"best {_fmt(state.best_eval_loss)} at step {state.best_step}")
    if state.skipped_steps:
        summary += f"; {state.skipped_steps} updates skipped (non-finite)"
    summary += f"; adapter saved to {adapter_dir}"
    log(summary)
    return FitResult(step=state.step, epoch=final["epoch_progress"], train_loss=train_loss,
                     eval_loss=state.last_eval_loss, eval_perplexity=state.last_eval_perplexity,
                     best_eval_loss=state.best_eval_loss, best_step=state.best_step,
                     skipped_steps=state.skipped_steps, resumed_from=resumed_from, output_dir=out,
                     adapter_dir=adapter_dir, losses=result_losses, summary=summary)
