"""The training loop: fit(model, objective, config, output_dir) -> FitResult.

Reads top to bottom like nanoGPT's train.py (lr, forward, loss, backward, clip, step, zero_grad, log), as one
function with no globals. What is particular to a way of training (its batches, loss, normaliser, metrics,
evaluation) is the objective's (objectives/); what is particular to torchrun is the runtime's (runtime.py);
what a checkpoint holds and how a run resumes is state.py's. Around the core: the NaN/inf policy of
RELIABILITY.md section 4, evaluation and saving cadence, metrics.jsonl and plain-callable hooks.

Step numbers are 1-based: step n is the n-th optimizer step, and checkpoint step-n holds the state after it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..atomic import write_text_atomic
from ..config import SpeedConfig, TrainConfig
from ..data import PreparedData
from ..errors import ConfigError, DataError, TrainingError
from ..signals import Terminated, sigterm_as_interrupt, sigterm_ignored
from .checkpoint import trainable_parameters
from .activation_checkpointing import enable_checkpointing
from .chunked_loss import split_head
from .evaluate import eval_result
from .fingerprint import run_fingerprints
from .forgetting import ForgettingGate, forgetting_summary, write_final_adapter
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, NullMetricsLog, plot_losses
from .objectives import Objective, objective_for
from .output_dir import ADAPTER_DIR, TRAINER_STATE
from .runtime import OneProcess, Runtime
from .schedule import build_scheduler
from .speed import setup_speed
from .state import Checkpoints, TrainState
from .tasks import TaskSet

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
    stopped_reason: str | None = None
    """"forgetting": an evaluation (the end's included) went over eval.max_forgetting with on_forgetting stop, so
    the run stopped there and adapter_dir holds the best checkpoint within the limits; None otherwise."""


# ---- the loop -----------------------------------------------------------------------------------------
def fit(model: torch.nn.Module, objective: Objective | PreparedData | TaskSet, config: TrainConfig,
        output_dir: str | Path, *, runtime: Runtime | None = None, eval_data: PreparedData | None = None,
        hooks: Iterable[Hook] = (), log: Callable[[str], None] = print, resume: str | None = None,
        speed: SpeedConfig | None = None, overwrite: bool = False, allow_change: Iterable[str] = (),
        settings: dict | None = None, forgetting: ForgettingGate | None = None) -> FitResult:
    """Train the trainable parameters of `model` on `objective` as `config` says; write checkpoints,
    metrics.jsonl, trainer_state.json and the final adapter (PEFT layout) under `output_dir`.

    `objective`: an Objective (objectives/), or data for supervised fine-tuning (objective_for: a PreparedData
    with `eval_data`, or a TaskSet, one adapter per task, saved to adapter/<task name>/). `resume` ("never",
    "auto" or a checkpoint directory) overrides `config.resume`. `output_dir` must be new or empty, or hold
    the run being resumed (output_dir.py); `overwrite` deletes a previous run's outputs there first (and
    nothing else). A resumed checkpoint must match this run's settings (`settings`: the run config's other
    sections, as fingerprint.run_settings records them), except those in fingerprint.MAY_CHANGE and those
    named in `allow_change`. Hooks are called as hook(event, info) with event "step", "eval" or "save". On
    KeyboardInterrupt (and SIGTERM, raised as one) a checkpoint of the last completed step is saved and the
    interrupt re-raised. Non-finite loss or gradients follow `config.nan_policy`; giving up raises
    TrainingError and leaves the last good checkpoint in place. `speed` (default: SpeedConfig()'s fast path)
    is applied for the run and undone when fit returns. `runtime` (default OneProcess()): under torchrun, this
    process's runtime.Torchrun; it trains on its share of each step and only rank 0 logs, calls hooks and writes.
    `forgetting` (forgetting.py) scores general text with and without the adapter at each evaluation (the end's
    at least); with limits, only evaluations within them count as best, and one over them warns or stops the
    run, a stop writing the best checkpoint within them as the adapter (the model keeps what trained).
    """
    out, runtime = Path(output_dir), runtime if runtime is not None else OneProcess()
    log, hooks = runtime.log(log), tuple(hooks) if runtime.is_main else ()
    if isinstance(objective, (PreparedData, TaskSet)):  # the Python API's shorthand for supervised fine-tuning
        objective = objective_for(objective, config, model, eval_data=eval_data)
    elif eval_data is not None:
        raise ConfigError("fit: eval_data goes with training data; an objective holds its own evaluation data "
                          "(LanguageModeling(data, config, eval_data=...))", where="fit")
    if config.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"nan_policy: {config.nan_policy!r} is not one of stop, skip", where="train config")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    params = trainable_parameters(model)
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with a LoRA config first")
    n_batches = objective.batches_per_epoch()
    window_size = config.grad_accum * runtime.world
    steps_per_epoch = (objective.steps_per_epoch(window_size) if hasattr(objective, "steps_per_epoch")
                       else math.ceil(n_batches / window_size))
    total_steps = total_steps_for(config, steps_per_epoch)
    optimizer = build_optimizer(params, config, objective.learning_rates() if hasattr(objective, "learning_rates") else None)
    scheduler = build_scheduler(optimizer, config.lr_schedule, warmup_steps=config.warmup_steps, total_steps=total_steps)
    state = TrainState()
    checkpoints = Checkpoints(out, params, optimizer, scheduler, keep_last=config.keep_checkpoints, runtime=runtime,
                              fingerprints=run_fingerprints(objective.fingerprint(), config, runtime.world, settings),
                              log=log, on_save=lambda step, path: _call(hooks, "save", {"step": step, "path": str(path)}),
                              objective_state=getattr(objective, "state_tensors", dict))
    compiled, undo_speed = _prepare_model(model, objective, config, speed, total_steps, log)
    was_training, started = model.training, time.perf_counter()
    model.train()
    metrics, bar, losses, recent, last_eval_step = NullMetricsLog(), None, [], deque(maxlen=SPIKE_WINDOW), None
    evaluates = objective.evaluates or forgetting is not None
    stopped_reason, over_limit_evals = None, 0

    def run_eval() -> None:
        nonlocal last_eval_step, stopped_reason, over_limit_evals
        # Without validation data (only general text) the result is empty: NaN loss, nothing to rank by.
        result = objective.evaluate(model, runtime) if objective.evaluates else eval_result(0.0, 0)
        last_eval_step = state.step
        general = forgetting.measure(model, runtime) if forgetting is not None else None
        over = forgetting.exceeded(general) if general is not None else []
        # No perplexity where the loss is not a cross-entropy (preference objectives give NaN).
        state.last_eval_loss = None if math.isnan(result.loss) else result.loss  # grpo's evaluation has no loss
        state.last_eval_perplexity = None if math.isnan(result.perplexity) else result.perplexity
        # An evaluation over eval.max_forgetting is never the best (the step a stop falls back to).
        better = state.best_eval_loss is None or result.loss < state.best_eval_loss
        if not over and math.isfinite(result.loss) and better:
            state.best_eval_loss, state.best_step = result.loss, state.step
        elif not over and result.tokens == 0 and forgetting is not None and forgetting.limited:
            state.best_step = state.step  # no loss to rank by (grpo, no validation data): the latest within limits
        info = {"step": state.step, "eval_loss": result.loss, "eval_perplexity": result.perplexity, **result.fields,
                **(general.fields() if general is not None else {})}
        if over:
            over_limit_evals += 1
            info["over_max_forgetting"] = over
            if forgetting.stops:
                stopped_reason = info["stopped_reason"] = "forgetting"
        metrics.write({**info, "eval_tokens": result.tokens})
        perplexity = f", perplexity {result.perplexity:.2f}" if not math.isnan(result.perplexity) else ""
        scored = (f"loss {result.loss:.4f}{perplexity} (best {_fmt(state.best_eval_loss)} at step {state.best_step})"
                  if not math.isnan(result.loss) else "")  # grpo evaluates rewards, not a loss
        scored += f" | {general.line()}" if general is not None else ""
        log(f"eval at step {state.step}: " + f"{scored}{_by_part(result.parts)}{_by_part(result.fields)}".lstrip(" |"))
        if over:
            then = "stopping (eval.on_forgetting: stop)" if forgetting.stops else "going on (eval.on_forgetting: warn)"
            log(f"warning: step {state.step}: forgetting over eval.max_forgetting: {', '.join(over)}; {then}")
        elif forgetting is not None and forgetting.limited and state.best_step == state.step \
                and checkpoints.last_saved != state.step:
            checkpoints.save(state, "the best evaluation within eval.max_forgetting")  # what a stop falls back to
        _call(hooks, "eval", {**info, "tokens": result.tokens})

    try:
        with checkpoints.locked(), sigterm_as_interrupt(), checkpoints.outcome_recorded():
            resume = str(config.resume if resume is None else resume)
            checkpoints.start(state, resume=resume, overwrite=overwrite, allow_change=allow_change,
                              batches_per_epoch=n_batches)
            if hasattr(objective, "load_state_tensors"):
                objective.load_state_tensors(checkpoints.resumed_objective_state)  # {} when starting afresh
            metrics = MetricsLog(out, keep_until_step=checkpoints.resumed_from) if runtime.is_main else metrics
            for line in [*objective.describe(), _describe(objective, config, n_batches, total_steps, params),
                         runtime.describe(config.grad_accum, config.batch_size),
                         forgetting.describe() if forgetting is not None else None]:
                if line:
                    log(line)
            bar = _progress(total_steps, state.step) if runtime.is_main else None
            window_rng = None
            try:
                while state.step < total_steps and stopped_reason is None:
                    if state.batches_done >= n_batches:  # epoch finished: the next starts at its first batch
                        state.epoch, state.batches_done = state.epoch + 1, 0
                    step_at_start, fresh_epoch = state.step, state.batches_done == 0
                    # The order is a pure function of (seed, epoch): skipping k batches lands on the exact batch.
                    # Examples are grouped by length only within a step's micro-batches: steps of similar lengths
                    # pad less but train worse (bench/quality.py), so each step is a random sample.
                    for window in _windows(objective.batches(state.epoch, state.batches_done, window_size), window_size):
                        # RNG at the window's start: an interrupt mid-window saves this, so the redo draws the same.
                        window_rng, t0 = (torch.get_rng_state(), random.getstate()), time.perf_counter()
                        normaliser = objective.normaliser(window)
                        if not any(normaliser.values()):  # no 0/0: a window of prompt-only rows is skipped and counted
                            state.empty_windows, state.batches_done, window_rng = state.empty_windows + 1, state.batches_done + len(window), None
                            log(f"warning: step {state.step + 1}: no supervised tokens in the window; skipped")
                            continue

                        # forward + backward of this process's share; the window's sums and gradients over all
                        lr = scheduler.get_last_lr()[0]
                        step = objective.window_metrics(_accumulate(model, objective, window, normaliser, runtime,
                                                                    compiled), normaliser)
                        runtime.sum_gradients(list(params.values()))
                        grad_norm, grad_fields = objective.clip(params, config.max_grad_norm)  # norm before clipping
                        finite = math.isfinite(step.loss) and math.isfinite(grad_norm)
                        if finite:
                            optimizer.step()
                            scheduler.step()
                            state.consecutive_skips = 0
                        optimizer.zero_grad(set_to_none=True)
                        state.step, state.batches_done, window_rng = state.step + 1, state.batches_done + len(window), None
                        elapsed, epoch_f = time.perf_counter() - t0, state.epoch + state.batches_done / n_batches
                        row = {"step": state.step, "epoch": round(epoch_f, 4), "loss": step.loss, "lr": lr,
                               "grad_norm": grad_norm, "tokens": step.tokens,
                               "tokens_per_s": step.tokens / elapsed if elapsed > 0 else None, **step.fields, **grad_fields}
                        losses.append(step.loss)
                        _record(row, finite, state, config, metrics, recent, log, checkpoints.last_good_note)

                        # log
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s'] or 0:.0f}")
                        elif state.step % config.log_every == 0 or state.step == total_steps:
                            log(f"step {state.step}/{total_steps} | epoch {epoch_f:.2f} | loss {step.loss:.4f}"
                                f"{_by_part(step.parts)} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                                f"{row['tokens_per_s'] or 0:.0f} tok/s")
                        _call(hooks, "step", {**row, "skipped": not finite})

                        if evaluates and config.eval_every and state.step % config.eval_every == 0:
                            run_eval()
                        if (config.save_every and state.step % config.save_every == 0
                                and checkpoints.last_saved != state.step):  # not saved by run_eval
                            checkpoints.save(state, f"every {config.save_every} steps")
                        if state.step >= total_steps or stopped_reason is not None:
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
                metrics.close()
                log(f"{'terminated (SIGTERM)' if isinstance(stop, Terminated) else 'interrupted'} at step "
                    f"{state.step}; saving a checkpoint to resume from")
                with sigterm_ignored():
                    path = checkpoints.save(state, "interrupted")
                log(f"resume with resume=auto (or {path})")
                raise

            # ---- the end: last eval, last checkpoint, adapter, trainer state, plot ----
            if evaluates and last_eval_step != state.step:
                run_eval()
            if checkpoints.last_saved != state.step:
                checkpoints.save(state, "stopped: forgetting over eval.max_forgetting" if stopped_reason
                                 else "end of training")
            adapter_dir = out / ADAPTER_DIR
            final = {**state.as_dict(), "total_steps": total_steps, "epoch_progress": state.epoch + state.batches_done / n_batches,
                     "resumed_from": checkpoints.resumed_from, "adapter": str(adapter_dir), "metrics": METRICS_FILE,
                     "stopped_reason": stopped_reason, "adapter_step": state.step}
            if runtime.is_main:
                final.update(write_final_adapter(model, params, state, out, adapter_dir, stopped_reason, log))
                write_text_atomic(out / TRAINER_STATE, json.dumps(final, indent=1, allow_nan=False) + "\n")
                if plot_losses(metrics.rows(), out / PLOT_FILE):
                    log(f"loss curve: {out / PLOT_FILE}")
            runtime.barrier()  # the others return once rank 0's files are complete
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        model.train(was_training)
        undo_speed(len(losses))

    train_loss = next((x for x in reversed(losses) if math.isfinite(x)), None)
    summary = _summary(state, final["epoch_progress"], time.perf_counter() - started, train_loss, adapter_dir)
    summary += forgetting_summary(forgetting, over_limit_evals, stopped_reason, state, final["adapter_step"])
    log(summary)
    return FitResult(step=state.step, epoch=final["epoch_progress"], train_loss=train_loss,
                     eval_loss=state.last_eval_loss, eval_perplexity=state.last_eval_perplexity,
                     best_eval_loss=state.best_eval_loss, best_step=state.best_step,
                     skipped_steps=state.skipped_steps, resumed_from=checkpoints.resumed_from, output_dir=out,
                     adapter_dir=adapter_dir, losses=losses, summary=summary, stopped_reason=stopped_reason)


# ---- the loop's parts ---------------------------------------------------------------------------------
def _accumulate(model: torch.nn.Module, objective: Objective, window: list[dict], normaliser: dict,
                runtime: Runtime, compiled: bool) -> dict[str, float]:
    """Forward and backward of this process's micro-batches of `window`; returns the window's sums over all
    processes (each micro-batch's loss is already divided by the whole window's normaliser)."""
    mine, fillers = runtime.split(window)
    sums = dict.fromkeys(objective.sum_keys, 0.0)
    for batch in mine:
        loss = objective.loss(model, batch, normaliser, compiled=compiled)
        loss.term.backward()
        for key, value in loss.sums.items():
            sums[key] += value
    for batch in fillers:
        # fsdp: every forward and backward gathers weights, so every process runs as many as the busiest;
        # this one's share was short, so it repeats one with zero weight.
        (objective.loss(model, batch, normaliser, compiled=compiled).term * 0.0).backward()
    return dict(zip(sums, runtime.sum(list(sums.values()))))


def _record(row: dict, finite: bool, state: TrainState, config: TrainConfig, metrics, recent: deque,
            log: Callable[[str], None], last_good: Callable[[], str]) -> None:
    """Write the step's metrics row. A non-finite step follows nan_policy (RELIABILITY.md section 4): stop, or
    skip the update, up to MAX_CONSECUTIVE_SKIPS in a row and MAX_TOTAL_SKIPS in all; a spike is flagged."""
    if not finite:
        what = f"loss {row['loss']} / grad norm {row['grad_norm']}"
        metrics.write({**row, "skipped": True})
        if config.nan_policy == "stop":
            raise TrainingError(f"step {state.step}: non-finite {what} (nan_policy=stop); stopping; {last_good()}",
                                step=state.step)
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log(f"warning: step {state.step}: non-finite {what}; update skipped "
            f"({state.consecutive_skips} in a row, {state.skipped_steps} in all)")
        if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS or state.skipped_steps >= MAX_TOTAL_SKIPS:
            raise TrainingError(f"step {state.step}: {state.consecutive_skips} consecutive / {state.skipped_steps} "
                                f"total skipped updates (limits {MAX_CONSECUTIVE_SKIPS} / {MAX_TOTAL_SKIPS}); "
                                f"stopping; {last_good()}", step=state.step)
        return
    if len(recent) >= 10 and row["loss"] > SPIKE_FACTOR * statistics.median(recent):
        row["spike"] = True
        log(f"warning: step {state.step}: loss spike {row['loss']:.4f} "
            f"(> {SPIKE_FACTOR:g}x the median of the last {len(recent)} steps)")
    recent.append(row["loss"])
    metrics.write(row)


def _prepare_model(model: torch.nn.Module, objective: Objective, config: TrainConfig, speed: SpeedConfig | None,
                   total_steps: int, log: Callable[[str], None]) -> tuple[bool, Callable[[int], None]]:
    """Activation checkpointing and the speed options for this run: (whether the loss is compiled, undo)."""
    if config.loss_chunk_tokens is not None and split_head(model) is None:
        log("note: train.loss_chunk_tokens has no effect on this model (its logits are not just lm_head of the "
            "last hidden state); the loss is computed from the full logits")
    base = getattr(model, "model", model)
    disable_checkpointing = enable_checkpointing(base, config.checkpoint_every) if config.gradient_checkpointing else None
    speed = speed if speed is not None else SpeedConfig()
    if objective.compile_obstacle and speed.compile != "off":
        log(f"speed: not compiling: {objective.compile_obstacle}")
        speed = dataclasses.replace(speed, compile="off")
    setup = setup_speed(model, speed, total_steps=total_steps, checkpointing=config.gradient_checkpointing)
    for note in setup.notes:
        log(note)

    def undo(steps_trained: int) -> None:
        setup.undo(steps_trained)
        if disable_checkpointing is not None:
            disable_checkpointing()
    return setup.compiled, undo


def build_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig,
                    learning_rates: dict[int, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only. With LoRA+ (Hayou et al. 2024, section 4) the B matrices get
    their own group at lr x loraplus_lr_ratio; group 0 always holds the rest (A, DoRA magnitudes, heads) at
    train.lr. `learning_rates` (id(parameter) -> peak lr: a task's or sweep member's own) puts those parameters in
    groups of their own, LoRA+ applying within them; the scheduler scales every group by the same factor."""
    roles = {}
    if config.loraplus_lr_ratio is not None:
        from ..lora import parameter_roles

        roles = parameter_roles(params)  # by the adapter method's role, on every layer kind (embeddings too)
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(config.lr, False): []}  # group 0 first
    for name, p in params.items():
        is_b = roles.get(name) == "B"
        groups.setdefault(((learning_rates or {}).get(id(p), config.lr), is_b), []).append(p)
    return torch.optim.AdamW([{"params": members, "lr": lr * config.loraplus_lr_ratio if is_b else lr}
                              for (lr, is_b), members in groups.items() if members],
                             lr=config.lr, weight_decay=config.weight_decay)


def total_steps_for(config: TrainConfig, steps_per_epoch: int) -> int:
    """max_steps, or enough steps for `epochs` epochs (a short last window per epoch counts as a step)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * steps_per_epoch))


def _windows(batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into accumulation windows of `size`; the epoch's last one may be shorter, and so may
    one that the objective ends early (a micro-batch with "ends_window": GRPO reusing a short rollout)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size or batch.get("ends_window"):
            yield window
            window = []
    if window:
        yield window


def _describe(objective: Objective, config: TrainConfig, n_batches: int, total_steps: int, params: dict) -> str:
    return (f"training {objective.examples} examples: {n_batches} batches of {config.batch_size} per epoch, "
            f"grad_accum {config.grad_accum}, {total_steps} steps; {sum(p.numel() for p in params.values()):,} "
            "trainable parameters")


def _summary(state: TrainState, epochs: float, seconds: float, train_loss: float | None, adapter_dir: Path) -> str:
    summary = f"{state.step} steps ({epochs:.2f} epochs) in {seconds:.1f}s; last train loss {_fmt(train_loss)}"
    if state.last_eval_loss is not None:
        perplexity = state.last_eval_perplexity
        perplexity = "" if perplexity is None else f" (perplexity {_fmt(perplexity, '.2f')})"
        summary += (f"; eval loss {_fmt(state.last_eval_loss)}{perplexity}, "
                    f"best {_fmt(state.best_eval_loss)} at step {state.best_step}")
    if state.skipped_steps:
        summary += f"; {state.skipped_steps} updates skipped (non-finite)"
    return summary + f"; adapter saved to {adapter_dir}"


def _call(hooks: tuple[Hook, ...], event: str, info: dict) -> None:
    for hook in hooks:
        hook(event, info)


def _by_part(parts: dict[str, float | None]) -> str:
    return "".join(f" | {name} {_fmt(value)}" for name, value in parts.items())


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
