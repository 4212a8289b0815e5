"""Preference tuning objectives: DPO and its loss family, ORPO (pairs) and KTO (labelled completions).

A micro-batch of pairs runs as one forward of 2 x batch rows (chosen, then rejected); the reference is the same
model with adapters disabled, or a frozen reference adapter routed to every row, under no_grad, or log-probs
computed once before training (precompute). A window's loss is the mean over ALL its examples (pairs, or KTO
completions): each micro-batch's summed loss is divided by the window's count, so accumulation and processes
give the gradient of that mean. ORPO's cross-entropy term is the mean over the window's chosen tokens.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ...config import PreferenceConfig, TrainConfig
from ...data import LengthGroupedBatchSampler
from ...data.preference import PreferenceData, kl_partners, preference_batches, sequence_lengths
from ...errors import DataError
from ...lora import LoraModel
from ..evaluate import EvalResult, model_device
from ..logprobs import completion_log_probs
from ..runtime import Runtime
from .base import BatchLoss, Normaliser, WindowMetrics, batch_tokens, clip_together
from .preference_losses import dpo_losses, kto_losses, orpo_losses

REFERENCE_ADAPTER = "reference"
"""The name a frozen reference adapter is loaded under (preference.reference.adapter)."""


class Reference:
    """Where the reference log-probabilities come from: the base (adapters disabled), a frozen adapter, or
    nowhere (reference-free losses). Always under no_grad."""

    def __init__(self, kind: str, chunk_tokens: int | None):
        if kind not in ("base", "adapter", "none"):
            raise ValueError(f"unknown reference {kind!r}")
        self.kind, self.chunk_tokens = kind, chunk_tokens

    def log_probs(self, model: nn.Module, batch: dict, prefix: str = "") -> torch.Tensor:
        """(rows,) summed log-probabilities of each row's labelled tokens under the reference."""
        with torch.no_grad():
            if self.kind == "adapter":
                return completion_log_probs(model, batch, self.chunk_tokens, adapter=REFERENCE_ADAPTER,
                                            input_prefix=prefix)[0]
            if not isinstance(model, LoraModel):
                raise TypeError("the base reference needs a LoraModel, whose adapters it disables")
            with model.disable_adapters():
                return completion_log_probs(model, batch, self.chunk_tokens, input_prefix=prefix)[0]


class Preference:
    """objective dpo (any loss_type), orpo or kto over PreferenceData (pairs, or KTO's labelled completions)."""

    compile_obstacle = None

    def __init__(self, kind: str, data: PreferenceData, config: TrainConfig, preference: PreferenceConfig,
                 reference: Reference, *, eval_data: PreferenceData | None = None):
        if kind not in ("dpo", "orpo", "kto"):
            raise ValueError(f"unknown preference objective {kind!r}")
        if not data.examples:
            raise DataError("no training examples left after preparation")
        if data.paired != (kind != "kto"):
            raise DataError(f"objective {kind} needs {'{prompt, completion, label}' if kind == 'kto' else 'pairs'}")
        self.kind, self.data, self.eval_data, self.config, self.preference = kind, data, eval_data, config, preference
        self.reference = reference
        self.examples, self.evaluates = len(data.examples), eval_data is not None
        # KTO estimates the KL term from mismatched completions, fixed per example (see kl_partners).
        self.partners = kl_partners(len(data.examples), config.batch_size) if kind == "kto" else None
        self.eval_partners = (kl_partners(len(eval_data.examples), config.batch_size)
                              if kind == "kto" and eval_data is not None else None)
        self.precomputed: dict[str, torch.Tensor] = {}  # "train"/"eval" -> (examples, columns) reference log-probs
        self.sum_keys = ("loss", "examples", "tokens", "chosen_rewards", "rejected_rewards", "chosen", "rejected",
                         "accurate", "chosen_logps", "rejected_logps", "nll", "chosen_tokens", "log_odds", "kl", "kl_batches")

    @property
    def uses_reference(self) -> bool:
        return self.kind == "kto" or (self.kind == "dpo" and self.preference.loss_type != "simpo")

    # ---- the Objective protocol ------------------------------------------------------------------------
    def describe(self) -> list[str]:
        pref = self.preference
        what = {"dpo": f"dpo ({pref.loss_type}), beta {pref.beta:g}", "orpo": f"orpo, lambda {pref.orpo_lambda:g}",
                "kto": f"kto, beta {pref.beta:g}, weights {pref.desirable_weight:g}/{pref.undesirable_weight:g}"}
        if not self.uses_reference:
            ref = "no reference model"
        else:
            ref = {"base": "the base with adapters disabled", "adapter": "the frozen starting adapter"}[self.reference.kind]
            ref = "reference: " + ref + ("; its log-probs precomputed" if self.precomputed else "")
        return [f"objective: {what[self.kind]}; {ref}"]

    def batches_per_epoch(self) -> int:
        return len(LengthGroupedBatchSampler(sequence_lengths(self.data), self.config.batch_size))

    def batches(self, epoch: int, start: int, group: int) -> Iterator[dict]:
        every = preference_batches(self.data, self.config.batch_size, seed=self.config.seed, epoch=epoch, group=group,
                                   partners=self.partners)
        return itertools.islice(every, start, None)

    def normaliser(self, window: Sequence[dict]) -> Normaliser:
        out = {"examples": sum(int(b["index"].numel()) for b in window)}
        if self.kind == "orpo":
            out["chosen_tokens"] = sum(int(_chosen_tokens(b)) for b in window)
        return out

    def loss(self, model: nn.Module, batch: dict, normaliser: Normaliser, *, compiled: bool = False) -> BatchLoss:
        total, sums = self._scores(model, batch, "train", normaliser)
        return BatchLoss(total, sums)

    def window_metrics(self, sums: dict[str, float], normaliser: Normaliser) -> WindowMetrics:
        loss = sums["loss"] / normaliser["examples"]
        if self.kind == "orpo":
            loss += sums["nll"] / max(normaliser["chosen_tokens"], 1)
        return WindowMetrics(loss=loss, tokens=int(sums["tokens"]), fields=self._fields(sums))

    def clip(self, params: dict[str, nn.Parameter], max_norm: float | None) -> tuple[float, dict]:
        return clip_together(params, max_norm), {}

    def evaluate(self, model: nn.Module, runtime: Runtime) -> EvalResult:
        """The objective's loss and reward metrics over the validation data (all of it counts once)."""
        batches = preference_batches(self.eval_data, self.config.batch_size, seed=self.config.seed, epoch=0,
                                     partners=self.eval_partners)
        mine, fillers = runtime.split(batches)
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(self.sum_keys, 0.0)
        try:
            with torch.no_grad():
                for batch in mine:
                    for key, value in self._scores(model, batch, "eval", None)[1].items():
                        sums[key] += value
                for batch in fillers:  # fsdp: as many forwards as the busiest process
                    self._scores(model, batch, "eval", None)
        finally:
            model.train(was_training)
        sums = dict(zip(sums, runtime.sum(list(sums.values()))))
        examples = int(sums["examples"])
        loss = sums["loss"] / examples if examples else math.nan
        if self.kind == "orpo" and examples:
            loss += sums["nll"] / max(sums["chosen_tokens"], 1)
        fields = {f"eval_{key}": value for key, value in self._fields(sums).items()}
        return EvalResult(loss=loss, perplexity=math.nan, tokens=int(sums["tokens"]), fields=fields)

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(self.kind.encode() + b"\0")
        for e in self.data.examples:
            parts = ([e.prompt_ids, e.chosen_ids, e.rejected_ids] if self.data.paired
                     else [e.prompt_ids, e.completion_ids, [int(e.desirable)]])
            for ids in parts:
                digest.update(array.array("q", ids).tobytes() + b"|")
        return {"data.sha256": digest.hexdigest(), "data.examples": len(self.data.examples), "objective": self.kind}

    # ---- reference log-probabilities computed once ------------------------------------------------------
    def precompute_reference(self, model: nn.Module, log: Callable[[str], None] = print) -> None:
        """Score every training (and validation) example under the reference once, so each step runs only the
        policy. Deterministic: a resumed run recomputes the same numbers."""
        if not self.uses_reference:
            return
        was_training = model.training
        model.eval()
        try:
            for name, data, partners in (("train", self.data, self.partners),
                                         ("eval", self.eval_data, self.eval_partners)):
                if data is None:
                    continue
                columns = 2 if data.paired or partners is not None else 1
                table = torch.zeros(len(data.examples), columns, dtype=torch.float32)
                for batch in preference_batches(data, self.config.batch_size, seed=0, epoch=0, partners=partners):
                    table[batch["index"], :] = self._reference_columns(model, batch).cpu()
                self.precomputed[name] = table
                log(f"reference log-probs of {len(data.examples)} {name} examples precomputed")
        finally:
            model.train(was_training)

    def _reference_columns(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(examples, 2): pairs: chosen, rejected; KTO: the completion, its KL partner's completion."""
        logps = self.reference.log_probs(model, batch)
        if self.kind != "kto":
            return torch.stack(logps.chunk(2), dim=1)
        return torch.stack([logps, self.reference.log_probs(model, batch, prefix="kl_")], dim=1)

    def _reference(self, model: nn.Module, batch: dict, split: str) -> torch.Tensor:
        table = self.precomputed.get(split)
        if table is None:
            return self._reference_columns(model, batch)
        return table[batch["index"]].to(model_device(model))

    # ---- the loss and its metrics -------------------------------------------------------------------------
    def _scores(self, model: nn.Module, batch: dict, split: str, normaliser: Normaliser | None) \
            -> tuple[torch.Tensor, dict[str, float]]:
        """(this micro-batch's term of the window's loss, its sums); `normaliser` None: the plain sum."""
        chunk = self.config.loss_chunk_tokens
        logps, counts = completion_log_probs(model, batch, chunk)  # (rows,), (rows,)
        examples = int(batch["index"].numel())
        divide = normaliser["examples"] if normaliser is not None else 1
        sums = {"examples": examples, "tokens": batch_tokens(batch)}
        if self.kind == "kto":
            return self._kto(model, batch, split, logps, divide, sums)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        term_extra = None
        if self.kind == "orpo":
            chosen_mean = chosen / chosen_tokens.clamp(min=1)
            rejected_mean = rejected / rejected_tokens.clamp(min=1)
            losses, chosen_rewards, rejected_rewards, log_odds = orpo_losses(chosen_mean, rejected_mean, self.preference)
            nll = -chosen.sum()
            term_extra = nll / (max(normaliser["chosen_tokens"], 1) if normaliser is not None else 1)
            sums.update(nll=float(nll.detach()), chosen_tokens=float(chosen_tokens.sum()),
                        log_odds=float(log_odds.sum()))
            shown_chosen, shown_rejected = chosen_mean, rejected_mean
        else:
            ref = self._reference(model, batch, split) if self.uses_reference else None
            ref_chosen, ref_rejected = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
            losses, chosen_rewards, rejected_rewards = dpo_losses(chosen, rejected, ref_chosen, ref_rejected,
                                                                  chosen_tokens, rejected_tokens, self.preference)
            simpo = self.preference.loss_type == "simpo"
            shown_chosen = chosen / chosen_tokens.clamp(min=1) if simpo else chosen
            shown_rejected = rejected / rejected_tokens.clamp(min=1) if simpo else rejected
        sums.update(loss=float(losses.detach().sum()), chosen=examples, rejected=examples,
                    chosen_rewards=float(chosen_rewards.sum()), rejected_rewards=float(rejected_rewards.sum()),
                    accurate=float((chosen_rewards > rejected_rewards).sum()),
                    chosen_logps=float(shown_chosen.detach().sum()), rejected_logps=float(shown_rejected.detach().sum()))
        term = losses.sum() / divide
        return (term + term_extra if term_extra is not None else term), sums

    def _kto(self, model: nn.Module, batch: dict, split: str, logps: torch.Tensor, divide: int, sums: dict) \
            -> tuple[torch.Tensor, dict[str, float]]:
        ref = self._reference(model, batch, split)  # (examples, 2): completion, KL partner
        with torch.no_grad():  # the KL estimate is a baseline, not a path for gradients (TRL: under no_grad)
            kl_logps = completion_log_probs(model, batch, self.config.loss_chunk_tokens, input_prefix="kl_")[0]
            kl = (kl_logps - ref[:, 1]).mean().clamp(min=0)
        desirable = batch["desirable"].to(logps.device)
        losses, rewards = kto_losses(logps, ref[:, 0], desirable, kl, self.preference)
        sums.update(loss=float(losses.detach().sum()), chosen=float(desirable.sum()), rejected=float((~desirable).sum()),
                    chosen_rewards=float(rewards[desirable].sum()), rejected_rewards=float(rewards[~desirable].sum()),
                    chosen_logps=float(logps.detach()[desirable].sum()),
                    rejected_logps=float(logps.detach()[~desirable].sum()), kl=float(kl), kl_batches=1.0)
        return losses.sum() / divide, sums

    def _fields(self, sums: dict[str, float]) -> dict[str, float | None]:
        """The metrics columns: mean rewards and log-probs of chosen (desirable) and rejected completions."""
        def mean(key: str, count: str) -> float | None:
            return sums[key] / sums[count] if sums.get(count) else None

        fields = {"rewards/chosen": mean("chosen_rewards", "chosen"),
                  "rewards/rejected": mean("rejected_rewards", "rejected"),
                  "logps/chosen": mean("chosen_logps", "chosen"), "logps/rejected": mean("rejected_logps", "rejected")}
        if fields["rewards/chosen"] is not None and fields["rewards/rejected"] is not None:
            fields["rewards/margins"] = fields["rewards/chosen"] - fields["rewards/rejected"]
        if self.kind == "kto":
            fields["kl"] = mean("kl", "kl_batches")
        else:
            fields["rewards/accuracies"] = mean("accurate", "examples")
        if self.kind == "orpo":
            fields["nll_loss"] = mean("nll", "chosen_tokens")
            fields["log_odds_chosen"] = mean("log_odds", "examples")  # TRL's name for the mean log odds ratio
        return fields


def _chosen_tokens(batch: dict) -> int:
    """Scored tokens of a pair batch's chosen rows (its first half)."""
    labels = batch["labels"]
    return int((labels[: labels.shape[0] // 2, 1:] != -100).sum())

