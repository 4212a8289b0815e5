"""The forgetting check (eval.general_text, eval.max_forgetting): how far training moved the model on general text.

At each evaluation the general text is scored under no_grad in eval mode twice: with the adapter, and with
adapters disabled (the base: the same model, no second copy in memory). Reported, over its supervised tokens:
the mean cross-entropy of each (general_loss, general_loss_base), their difference (general_loss_increase) and
the mean KL(p_base || p_adapter) of the next-token distributions (general_kl), the direction that grows when the
adapter gives low probability to what the base predicts:

    KL = sum_v p_base(v) * (log p_base(v) - log p_adapter(v))          (nats, per token)

The base's log-probabilities are recomputed at each evaluation (its weights are frozen, but caching its logits
would cost tokens x vocab). As in the training loss (chunked_loss.py), only supervised positions reach the
output projection, `chunk_tokens` of them at a time, so only one chunk's logits per side exist at once.
Under torchrun each process scores its share and the sums are added, as the objectives' evaluations do.

The gate: an evaluation over a limit warns or stops the run (eval.on_forgetting); the loop then counts as best
only evaluations within the limits, and on stop writes the best one's checkpoint as the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import RunConfig
from ..data import IGNORE_INDEX, PreparedData, iter_batches, prepare
from ..errors import CheckpointError, ConfigError, DataError
from .checkpoint import CHECKPOINTS, step_dir_name
from .chunked_loss import split_head
from .evaluate import model_device, model_inputs
from .restore import load_checkpoint
from .rng import capture_rng_state, restore_rng_state
from .runtime import Runtime
from .state import TrainState

FIELDS = ("general_loss", "general_loss_base", "general_loss_increase", "general_kl")


@dataclass(frozen=True)
class Forgetting:
    """One evaluation's numbers on the general text (NaN where it had no supervised token)."""

    loss: float
    """Mean cross-entropy per supervised token with the adapter."""
    loss_base: float
    """The same with adapters disabled."""
    kl: float
    """Mean KL(p_base || p_adapter) per supervised token."""
    tokens: int

    @property
    def loss_increase(self) -> float:
        return self.loss - self.loss_base

    def fields(self) -> dict[str, float | int]:
        """Its metrics.jsonl columns."""
        return dict(zip(FIELDS, (self.loss, self.loss_base, self.loss_increase, self.kl)), general_tokens=self.tokens)

    def line(self) -> str:
        return (f"general loss {self.loss:.4f} (base {self.loss_base:.4f}, {self.loss_increase:+.4f}), "
                f"KL {self.kl:.4f}")


def forgetting_sums(model: nn.Module, batches: Iterable[dict], *, chunk_tokens: int | None) -> list[float]:
    """[summed loss with the adapter, summed loss of the base, summed KL, supervised tokens] over `batches`, under
    no_grad in eval mode (the model's mode is restored). `model` must have disable_adapters() (a LoraModel)."""
    was_training, device = model.training, model_device(model)
    sums = [0.0, 0.0, 0.0, 0.0]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                for i, value in enumerate(_batch_sums(model, model_inputs(batch, device), batch["labels"], chunk_tokens)):
                    sums[i] += value
    finally:
        model.train(was_training)
    return sums


def _batch_sums(model: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None) -> tuple[float, ...]:
    """forgetting_sums of one batch: two forwards of the decoder (adapter, base), then the head chunk by chunk."""
    targets = labels[:, 1:]  # (batch, seq - 1): position t predicts labels[t + 1]
    keep = (targets != IGNORE_INDEX).to(device=model_device(model))  # (batch, seq - 1)
    t = targets.to(keep.device)[keep]  # (n,)
    split = split_head(model) if chunk_tokens is not None else None
    if split is None:  # the model's own logits, whole: (batch, seq, vocab) -> (n, vocab) per side
        def head(x: torch.Tensor) -> torch.Tensor:
            return x

        adapted = model(**inputs).logits[:, :-1][keep]
        with model.disable_adapters():
            base = model(**inputs).logits[:, :-1][keep]
        chunk = max(1, t.numel())
    else:  # hidden states of the supervised positions, (n, hidden) per side; lm_head a chunk at a time below
        decoder, head = split
        adapted = decoder(**inputs)[0][:, :-1][keep]
        with model.disable_adapters():
            base = decoder(**inputs)[0][:, :-1][keep]
        chunk = chunk_tokens
    loss = loss_base = kl = 0.0
    for start in range(0, t.numel(), chunk):
        rows = slice(start, start + chunk)
        log_p = torch.log_softmax(head(adapted[rows]).float(), dim=-1)  # (c, vocab)
        with model.disable_adapters():  # the head may carry a LoRA (lm_head targeted) too
            log_q = torch.log_softmax(head(base[rows]).float(), dim=-1)  # (c, vocab)
        loss -= float(log_p.gather(1, t[rows, None]).sum())
        loss_base -= float(log_q.gather(1, t[rows, None]).sum())
        # sum q (log q - log p), in place: about three (c, vocab) float32 tensors at a time, not five
        kl += float(log_q.exp().mul_(log_q.sub_(log_p)).sum())
    return loss, loss_base, kl, float(t.numel())


def measure_forgetting(model: nn.Module, batches: Iterable[dict], runtime: Runtime, *,
                       chunk_tokens: int | None) -> Forgetting:
    """The forgetting numbers of `batches`; under torchrun each process scores its share (fsdp: and repeats one
    batch where its share is short, so every process runs as many forwards) and the sums are added."""
    mine, fillers = runtime.split(batches)
    sums = forgetting_sums(model, mine, chunk_tokens=chunk_tokens)
    forgetting_sums(model, fillers, chunk_tokens=chunk_tokens)  # discarded
    loss, loss_base, kl, tokens = runtime.sum(sums)
    if not tokens:
        return Forgetting(math.nan, math.nan, math.nan, 0)
    return Forgetting(loss / tokens, loss_base / tokens, kl / tokens, int(tokens))


@dataclass
class ForgettingGate:
    """The general text of a run and its limits (eval section); `fit(..., forgetting=gate)` measures it at each
    evaluation."""

    data: PreparedData
    batch_size: int
    chunk_tokens: int | None = 1024
    loss_increase: float | None = None
    """Limit on general_loss_increase; None: none."""
    kl: float | None = None
    """Limit on general_kl; None: none."""
    on_forgetting: str = "stop"

    def __post_init__(self) -> None:
        if self.on_forgetting not in ("stop", "warn"):
            raise ConfigError(f"eval.on_forgetting: {self.on_forgetting!r} is not one of stop, warn", where="fit")

    @property
    def limited(self) -> bool:
        return self.loss_increase is not None or self.kl is not None

    @property
    def stops(self) -> bool:
        return self.limited and self.on_forgetting == "stop"

    def measure(self, model: nn.Module, runtime: Runtime) -> Forgetting:
        if not hasattr(model, "disable_adapters"):
            raise ConfigError("eval.general_text: the forgetting check compares the model with its adapters "
                              "disabled; wrap the model with lorakit.wrap (a LoraModel)", where="fit")
        if len(model.active_adapters) > 1:  # active adapters add up: the number would be of their sum
            raise ConfigError(f"eval.general_text: measures one adapter against its base, but "
                              f"{len(model.active_adapters)} are active ({', '.join(model.active_adapters)})",
                              where="fit")
        batches = iter_batches(self.data, self.batch_size, seed=0, epoch=0)
        return measure_forgetting(model, batches, runtime, chunk_tokens=self.chunk_tokens)

    def exceeded(self, result: Forgetting) -> list[str]:
        """The limits `result` is over, as "general_kl 0.0812 > 0.05" (empty: within them). NaN counts as over."""
        over = []
        for name, value, limit in (("general_loss_increase", result.loss_increase, self.loss_increase),
                                   ("general_kl", result.kl, self.kl)):
            if limit is not None and not value <= limit:
                over.append(f"{name} {value:.4f} > {limit:g}")
        return over

    def describe(self) -> str:
        limits = ", ".join(f"{name} {limit:g}" for name, limit in (("loss_increase", self.loss_increase),
                                                                     ("kl", self.kl)) if limit is not None)
        gate = f"; max_forgetting {limits} ({self.on_forgetting})" if limits else ""
        return (f"forgetting check: {len(self.data.examples)} examples of general text "
                f"({self.data.summary.source}) scored with and without the adapter at each evaluation{gate}")


def forgetting_gate(config: RunConfig, tokenizer, log: Callable[[str], None]) -> ForgettingGate | None:
    """The run config's eval section as a ForgettingGate with its general text prepared (None without
    general_text). The text's format is detected; it is neither packed nor shuffled (every row is scored)."""
    ev = config.eval
    if ev.general_text is None:
        return None
    options = dataclasses.replace(config.data, format="auto", packing=False)
    data = prepare(ev.general_text, tokenizer, options)
    log("general text: " + data.summary.line())
    if not any(label != IGNORE_INDEX for example in data.examples for label in example.labels[1:]):
        raise DataError(f"eval.general_text: {ev.general_text} has no token to score (every label is masked); "
                        "give text, or chat data with assistant replies")
    limits = ev.max_forgetting
    return ForgettingGate(data, config.train.batch_size, config.train.loss_chunk_tokens,
                          loss_increase=limits.loss_increase if limits else None, kl=limits.kl if limits else None,
                          on_forgetting=ev.on_forgetting)


def save_adapter_from(checkpoint: Path, model: nn.Module, params: dict[str, nn.Parameter], adapter_dir: Path) -> None:
    """Write the adapter that checkpoint `checkpoint` holds to `adapter_dir` (every file verified first), leaving
    the model's parameters and the RNG as they were."""
    trained = {name: p.detach().clone() for name, p in params.items()}
    rng = capture_rng_state()
    try:
        load_checkpoint(checkpoint, params)  # verifies every byte; restores the RNG too, undone below
        model.save_adapter(adapter_dir, model.active_adapters)
    finally:
        restore_rng_state(rng)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trained[name])


def write_final_adapter(model: nn.Module, params: dict, state: TrainState, out: Path, adapter_dir: Path,
                        stopped_reason: str | None, log: Callable[[str], None]) -> dict:
    """Save the adapter: what trained, or after a forgetting stop the best checkpoint within the limits. Returns
    the trainer-state entry naming the step whose adapter was written."""
    if stopped_reason == "forgetting" and state.best_step is not None and state.best_step != state.step:
        best = out / CHECKPOINTS / step_dir_name(state.best_step)
        try:
            save_adapter_from(best, model, params, adapter_dir)
        except CheckpointError as err:
            log(f"warning: cannot read the best checkpoint within eval.max_forgetting ({err}); the adapter saved is "
                f"the one trained to step {state.step}, over the limits")
        else:
            log(f"adapter: the checkpoint of step {state.best_step} (the best within eval.max_forgetting), from {best}")
            return {"adapter_step": state.best_step}
    elif stopped_reason == "forgetting" and state.best_step is None:
        log(f"warning: no evaluation stayed within eval.max_forgetting; the adapter saved is the one trained to "
            f"step {state.step}, over the limits")
    model.save_adapter(adapter_dir, model.active_adapters)  # what trained, not a frozen reference
    return {"adapter_step": state.step}


def forgetting_summary(forgetting: ForgettingGate | None, over_limit_evals: int, stopped_reason: str | None,
                       state: TrainState, adapter_step: int) -> str:
    """What the run's summary line adds about the limits: a stop and what adapter/ holds, or the warnings."""
    if forgetting is None or not forgetting.limited:
        return ""
    if stopped_reason == "forgetting":
        held = ("the adapter as trained: no evaluation stayed within the limits" if state.best_step is None
                else f"the adapter of step {adapter_step}" + (" (the best within the limits)"
                                                              if adapter_step == state.best_step else ""))
        return f"; stopped at step {state.step}: forgetting over eval.max_forgetting; adapter/ holds {held}"
    if over_limit_evals:
        return (f"; {over_limit_evals} evaluation(s) over eval.max_forgetting (on_forgetting: warn); best within "
                f"the limits: step {state.best_step}")
    return ""
