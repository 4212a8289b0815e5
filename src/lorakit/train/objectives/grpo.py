"""GRPO (objective grpo): reinforcement learning from the rewards of completions the model samples itself.

Each optimizer step takes a window of prompt micro-batches; `normaliser` rolls each one out first (rollout.py:
num_generations completions per prompt from lorakit's engine, on the very model being trained, with the adapter
being trained; scored by the reward functions; group-relative advantages), then `loss` runs the training forward
over prompt + completion and takes grpo_losses.policy_loss. On a fresh rollout the sampling policy is the policy:
the ratio is 1 in value (old log-probs = the forward's, detached, as TRL does), and the sampler's own log-probs
are logged beside them as `logp_mismatch` (a large value means generation and training disagree, which biases RL
silently). With num_iterations mu > 1 the window is trained on mu times, one optimizer step each (GRPO's inner
iterations, TRL's num_iterations): the later steps reuse the rollout, with the first step's log-probs as the old
policy's, so the ratio moves and clipping bounds the update. A checkpoint between two of them holds the rollout
(state_tensors), so a resume there trains on the same completions.

The rollout of micro-batch k of epoch e draws with seed f(train.seed, e, k): the same step draws the same
completions when it is run again, so a resumed run continues exactly. Evaluation answers each validation prompt
once, greedily, and logs the mean rewards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ...atomic import write_text_atomic
from ...config import RLConfig, TrainConfig
from ...data.prompts import PromptData
from ...errors import DataError, TrainingError
from ...infer import Engine, SamplingParams
from ...lora import LoraModel
from ..evaluate import EvalResult
from ..logprobs import token_log_probs_of_completions
from ..output_dir import SAMPLES_DIR
from ..rewards import RewardSet
from ..rollout import RolloutBatch, roll_out, rollout_from_tensors, rollout_tensors, training_batch
from ..runtime import OneProcess, Runtime
from .base import BatchLoss, Normaliser, WindowMetrics, batch_tokens, clip_together
from .grpo_losses import nanstd, policy_loss

MAX_ERRORS_LOGGED = 3  # per micro-batch: each failing reward is named with its record, without flooding the log


class GRPO:
    """objective grpo over PromptData, with the engine generating from `model` itself."""

    compile_obstacle = "objective grpo generates with the model between steps (the engine's KV-cache forward)"

    def __init__(self, model: LoraModel, tokenizer, data: PromptData, config: TrainConfig, rl: RLConfig,
                 rewards: RewardSet, *, eval_data: PromptData | None = None, log: Callable[[str], None] = print,
                 runtime: Runtime | None = None):
        if not data.records:
            raise DataError("no training prompts left after preparation")
        self.model, self.data, self.eval_data, self.config, self.rl, self.rewards = \
            model, data, eval_data, config, rl, rewards
        self.examples, self.evaluates = len(data.records), eval_data is not None and bool(eval_data.records)
        # under torchrun each process rolls out, trains on and evaluates its own share only
        self.runtime = runtime if runtime is not None else OneProcess()
        self.adapter = model.active_adapters[0]
        rows = config.batch_size * rl.num_generations
        longest = max(len(p.ids) for p in data.records + (eval_data.records if eval_data is not None else []))
        queued = max(rows, len(eval_data.records) if eval_data is not None else 0)  # evaluation submits them all
        self.engine = Engine(model, tokenizer, max_batch_size=rows, max_queue=queued,
                             max_prompt_tokens=longest, max_new_tokens=rl.max_completion_len)
        self.engine.start()
        self.names = [name for name, _, _ in rewards.functions]
        self.sum_keys = ("loss", "completions", "tokens", "completion_tokens", "reward", "reward_sq",
                         "group_std", "groups", "zero_std_groups", "truncated", "clipped_low", "clipped_high", "kl",
                         "mismatch", "reward_errors", "scored_rewards", "advantage", "advantage_sq", "advantage_abs",
                         *itertools.chain.from_iterable((f"{n}:sum", f"{n}:sq", f"{n}:count") for n in self.names))
        self.log = log
        self.rollout_seconds, self.rolled_out_at = 0.0, time.perf_counter()
        self.last_rollouts: list[RolloutBatch] = []  # the window's, for the samples file
        self.last_prompts: list[list[int]] = []
        # num_iterations > 1: the round's rollouts and the old policy's log-probs, by (epoch, prompt micro-batch)
        self.iteration = 0
        self.reused: dict[tuple[int, int], RolloutBatch] = {}
        self.old_logps: dict[tuple[int, int], torch.Tensor] = {}

    def close(self) -> None:
        self.engine.close()

    # ---- the Objective protocol ------------------------------------------------------------------------
    def describe(self) -> list[str]:
        rl = self.rl
        high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        kl = f"KL to the base, beta {rl.beta:g}" if rl.beta else "no KL term (beta 0)"
        rewards = ", ".join(f"{name} x {weight:g}" for name, _, weight in self.rewards.functions)
        return [f"objective: grpo ({rl.loss_type}), {rl.num_generations} completions per prompt at temperature "
                f"{rl.temperature:g}, top_p {rl.top_p:g}, up to {rl.max_completion_len} tokens; clip "
                f"[{1 - rl.epsilon:g}, {1 + high:g}]; {kl}; rewards: {rewards}"]

    def batches_per_epoch(self) -> int:
        return self.rl.num_iterations * self._prompt_batches()

    def steps_per_epoch(self, window_size: int) -> int:
        return self.rl.num_iterations * math.ceil(self._prompt_batches() / window_size)

    def batches(self, epoch: int, start: int, group: int) -> Iterator[dict]:
        """Each window of `group` prompt micro-batches, num_iterations times over (one optimizer step each time;
        the first rolls out, the others reuse its rollout); the last micro-batch of each ends its window."""
        order = list(range(len(self.data.records)))
        random.Random(f"grpo-{self.config.seed}-{epoch}").shuffle(order)  # a pure function of (seed, epoch)
        size, n = self.config.batch_size, self._prompt_batches()
        plan = []  # (prompt micro-batch, iteration, ends its window)
        for first in range(0, n, group):
            window = range(first, min(first + group, n))
            for iteration in range(self.rl.num_iterations):
                plan += [(k, iteration, k == window[-1]) for k in window]
        for k, iteration, last in plan[start:]:
            yield {"index": order[k * size:(k + 1) * size], "epoch": epoch, "batch": k, "iteration": iteration,
                   "ends_window": last}

    def normaliser(self, window: Sequence[dict]) -> Normaliser:
        """Roll out the window's prompts (the loop asks once per window), or take the rollout this window's first
        iteration made; then count what the loss divides by."""
        started = time.perf_counter()
        self.iteration = window[0]["iteration"]
        if self.iteration == 0:  # a new round: the previous window's rollout is done with
            self.reused.clear()
            self.old_logps.clear()
        mine = list(self.runtime.split(window)[0])  # the micro-batches this process trains on (the loop's split)
        for batch in mine:
            key = (batch["epoch"], batch["batch"])
            if self.iteration == 0:
                batch["rollout"] = self.reused[key] = self._roll_out(batch)
                for error in batch["rollout"].errors[:MAX_ERRORS_LOGGED]:
                    self.log(f"warning: {error.line()} (its reward counts as missing)")
            elif key in self.reused:
                batch["rollout"] = self.reused[key]
            else:
                raise TrainingError(f"iteration {self.iteration + 1} of {self.rl.num_iterations} of prompt batch "
                                    f"{batch['batch']} (epoch {batch['epoch']}) reuses a rollout that is not here: "
                                    "the checkpoint resumed from did not hold it; resume from a checkpoint saved "
                                    "at the end of a rollout's iterations, or start over")
        self.rolled_out_at = time.perf_counter()
        self.rollout_seconds = self.rolled_out_at - started
        self.last_rollouts = [b["rollout"] for b in mine]
        self.last_prompts = [b["index"] for b in mine]
        completions, tokens = self.runtime.sum([sum(int(b["rollout"].completion_ids.shape[0]) for b in mine),
                                                sum(int(b["rollout"].completion_mask.sum()) for b in mine)])
        return {"completions": int(completions), "tokens": int(tokens)}

    def loss(self, model: nn.Module, batch: dict, normaliser: Normaliser, *, compiled: bool = False) -> BatchLoss:
        rollout: RolloutBatch = batch["rollout"]
        rl, rows = self.rl, rollout.completion_ids.shape[0]
        inputs = training_batch(rollout)
        start = rollout.prompt_ids.shape[1] - 1  # the position whose logits predict the first completion token
        logps = self._token_logps(model, inputs)[:, start:]
        mask = rollout.completion_mask.to(logps.device)
        key = (batch["epoch"], batch["batch"])
        if batch["iteration"] == 0:  # on-policy: the policy that sampled is this forward's, ratio 1 in value
            old = logps.detach()
            if rl.num_iterations > 1:
                self.old_logps[key] = old.clone()  # ... and it stays the old policy for the later iterations
        else:
            old = self.old_logps[key].to(logps.device)
        ref = None
        if rl.beta:
            with torch.no_grad(), model.disable_adapters():
                ref = self._token_logps(model, inputs)[:, start:]
        out = policy_loss(logps, old, rollout.advantages.to(logps.device), mask, variant=rl.loss_type,
                          eps_low=rl.epsilon, eps_high=rl.epsilon_high, beta=rl.beta, ref_logps=ref,
                          max_completion_len=rl.max_completion_len, tokens=normaliser["tokens"])
        # grpo and dr_grpo average over this micro-batch's completions: weigh by its share of the window's
        term = out.loss if rl.loss_type == "dapo" else out.loss * rows / normaliser["completions"]
        scored = float(mask.sum())
        sums = {"loss": float(term.detach()), "completions": rows, "tokens": batch_tokens(inputs),
                "completion_tokens": scored,
                "clipped_low": float(out.clipped_low) * scored, "clipped_high": float(out.clipped_high) * scored,
                "kl": float(out.kl) * scored if out.kl is not None else 0.0,
                "mismatch": float(((old - rollout.old_logps.to(logps.device)).abs() * mask).sum()),
                **self._reward_sums(rollout)}
        return BatchLoss(term, sums)

    def window_metrics(self, sums: dict[str, float], normaliser: Normaliser) -> WindowMetrics:
        update_seconds = time.perf_counter() - self.rolled_out_at  # the window's forwards and backwards
        fields = self._fields(sums)
        fields["train_tokens_per_s"] = sums["tokens"] / update_seconds if update_seconds > 0 else None
        return WindowMetrics(loss=sums["loss"], tokens=int(sums["tokens"]), fields=fields)

    def clip(self, params: dict[str, nn.Parameter], max_norm: float | None) -> tuple[float, dict]:
        return clip_together(params, max_norm), {}

    def evaluate(self, model: nn.Module, runtime: Runtime) -> EvalResult:
        """Each validation prompt answered once, greedily; the mean of each reward and of their sum."""
        assert self.eval_data is not None
        was_training = model.training
        model.eval()
        records = list(runtime.split(self.eval_data.records)[0])  # this process's share
        try:
            greedy = SamplingParams(max_tokens=self.rl.max_completion_len, temperature=0.0)
            handles = self.engine.submit_many([(p.ids, self.adapter, greedy) for p in records])
            texts = ["".join(e.text for e in handle) for handle in handles]
        finally:
            model.train(was_training)
        scores = self.rewards.score([p.text for p in records], texts, [p.record for p in records],
                                    [p.location for p in records])
        for error in scores.errors[:MAX_ERRORS_LOGGED]:
            self.log(f"warning: evaluation: {error.line()} (its reward counts as missing)")
        # the same columns in every process, even one whose share is empty
        columns = {"eval_reward": scores.total,
                   **{f"eval_rewards/{n}": scores.per_function.get(n, []) for n in self.names}}
        sums = runtime.sum([x for values in columns.values() for x in _moments(values)[::2]])  # sum, count
        fields = {name: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else None for i, name in enumerate(columns)}
        return EvalResult(loss=math.nan, perplexity=math.nan, tokens=0, fields=fields)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """With num_iterations > 1, the round's rollouts and old log-probs (a checkpoint between two iterations
        must hold them: the next step trains on them again); nothing otherwise."""
        if self.rl.num_iterations == 1:
            return {}
        out = {}
        for j, (key, rollout) in enumerate(sorted(self.reused.items())):
            out[f"rollout.{j}.key"] = torch.tensor(key)
            out.update(rollout_tensors(rollout, f"rollout.{j}."))
            if key in self.old_logps:
                out[f"rollout.{j}.policy_logps"] = self.old_logps[key]
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.reused.clear()
        self.old_logps.clear()
        for j in itertools.count():
            if f"rollout.{j}.key" not in tensors:
                break
            key = tuple(tensors[f"rollout.{j}.key"].tolist())
            self.reused[key] = rollout_from_tensors(tensors, f"rollout.{j}.", self.names)
            if f"rollout.{j}.policy_logps" in tensors:
                self.old_logps[key] = tensors[f"rollout.{j}.policy_logps"]

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(b"grpo\0")
        for p in self.data.records:
            digest.update(json.dumps([p.ids, p.record], sort_keys=True, default=str).encode() + b"|")
        return {"data.sha256": digest.hexdigest(), "data.examples": len(self.data.records), "objective": "grpo"}

    # ---- samples ---------------------------------------------------------------------------------------
    def write_samples(self, step: int, out_dir: str | Path) -> Path:
        """The last window's completions with their rewards, as samples/step-N.jsonl (atomically; a step redone
        after a resume writes the same file again)."""
        lines = []
        for rollout, indices in zip(self.last_rollouts, self.last_prompts):
            rows = [self.data.records[i] for i in indices for _ in range(self.rl.num_generations)]
            for i, (prompt, completion) in enumerate(zip(rows, rollout.completions)):
                lines.append(json.dumps({
                    "step": step, "iteration": self.iteration + 1, "prompt": prompt.text,
                    "location": prompt.location, "completion": completion,
                    "finish_reason": rollout.finish_reasons[i], "reward": _finite(float(rollout.rewards[i])),
                    "advantage": float(rollout.advantages[i]),
                    "rewards": {name: _finite(values[i]) for name, values in rollout.per_function.items()}},
                    ensure_ascii=False))
        path = Path(out_dir) / SAMPLES_DIR / f"step-{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "\n".join(lines) + "\n")
        return path

    # ---- the parts -------------------------------------------------------------------------------------
    def _prompt_batches(self) -> int:
        return math.ceil(len(self.data.records) / self.config.batch_size)

    def _roll_out(self, batch: dict) -> RolloutBatch:
        step_seed = int.from_bytes(hashlib.sha256(
            f"{self.config.seed}-{batch['epoch']}-{batch['batch']}".encode()).digest()[:8], "little")
        params = SamplingParams(max_tokens=self.rl.max_completion_len, temperature=self.rl.temperature,
                                top_p=self.rl.top_p)
        was_training = self.model.training
        self.model.eval()  # generation without dropout, as the engine serves
        try:
            rollout = roll_out(self.engine, [self.data.records[i] for i in batch["index"]], self.adapter,
                               self.rl.num_generations, params, self.rewards, step_seed=step_seed,
                               pad_id=self.data.pad_token_id, scale_rewards=self.rl.scale_rewards)
        finally:
            self.model.train(was_training)
        return rollout

    def _token_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        logps, _ = token_log_probs_of_completions(model, inputs, self.config.loss_chunk_tokens,
                                                  temperature=self.rl.temperature)
        return logps

    def _reward_sums(self, rollout: RolloutBatch) -> dict[str, float]:
        rewards, g = rollout.rewards, self.rl.num_generations
        grouped = rewards.view(-1, g)
        stds = torch.nan_to_num(nanstd(grouped, dim=1), nan=0.0)  # a group with < 2 scored rewards: spread 0
        sums = {"group_std": float(stds.sum()), "groups": float(grouped.shape[0]),
                "zero_std_groups": float((stds < 1e-6).sum()),
                "truncated": float(sum(r == "length" for r in rollout.finish_reasons)),
                "reward_errors": float(len(rollout.errors)), "advantage_abs": float(rollout.advantages.abs().sum())}
        sums["reward"], sums["reward_sq"], sums["scored_rewards"] = _moments(rewards)
        sums["advantage"], sums["advantage_sq"], _ = _moments(rollout.advantages)
        for name, values in rollout.per_function.items():
            sums[f"{name}:sum"], sums[f"{name}:sq"], sums[f"{name}:count"] = _moments(values)
        return sums

    def _fields(self, sums: dict[str, float]) -> dict[str, float | None]:
        completions, scored = sums["completions"], sums["scored_rewards"]
        mean, std = _mean_std(sums["reward"], sums["reward_sq"], scored)
        tokens = sums["completion_tokens"]
        advantage_mean, advantage_std = _mean_std(sums["advantage"], sums["advantage_sq"], completions)
        fields = {"reward": mean, "reward_std": std,
                  "reward_group_std": sums["group_std"] / sums["groups"] if sums["groups"] else None,
                  "frac_reward_zero_std": sums["zero_std_groups"] / sums["groups"] if sums["groups"] else None,
                  **{f"rewards/{n}": sums[f"{n}:sum"] / sums[f"{n}:count"] if sums[f"{n}:count"] else None
                     for n in self.names},
                  **{f"rewards/{n}/std": _mean_std(sums[f"{n}:sum"], sums[f"{n}:sq"], sums[f"{n}:count"])[1]
                     for n in self.names},
                  # normalised per group, so the mean is ~0; |A| says how much the step has to learn from
                  "advantage_mean": advantage_mean, "advantage_std": advantage_std,
                  "advantage_abs_mean": sums["advantage_abs"] / completions if completions else None,
                  "completion_length": sums["completion_tokens"] / completions if completions else None,
                  "truncated_ratio": sums["truncated"] / completions if completions else None,
                  "clip_ratio/low": sums["clipped_low"] / tokens if tokens else None,
                  "clip_ratio/high": sums["clipped_high"] / tokens if tokens else None,
                  # generation vs training on the same weights: measurable on a fresh rollout only
                  "logp_mismatch": sums["mismatch"] / tokens if tokens and self.iteration == 0 else None,
                  "iteration": self.iteration + 1,
                  "reward_errors": int(sums["reward_errors"]),
                  "rollout_s": self.rollout_seconds if self.iteration == 0 else 0.0,
                  "rollout_tokens_per_s": sums["completion_tokens"] / self.rollout_seconds
                  if self.rollout_seconds and self.iteration == 0 else None}
        if self.rl.beta:
            fields["kl"] = sums["kl"] / tokens if tokens else None
        return fields


def _mean_std(total: float, squares: float, count: float) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation from a sum, a sum of squares and a count (None for none)."""
    if not count:
        return None, None
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


def _moments(values: Sequence[float] | torch.Tensor) -> tuple[float, float, float]:
    """The sum, the sum of squares and the number of the scored (not NaN) values, in float64."""
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    return float(v.sum()), float((v * v).sum()), float(v.numel())


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value
