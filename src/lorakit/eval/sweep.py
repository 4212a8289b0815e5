"""After a sweep (the run config's `sweep:`): every member scored on the validation data, ranked, the table written
to <output_dir>/sweep.json and printed, the best member's adapter copied to <output_dir>/best_adapter.

Each member is scored with its own adapter: the validation loss (the same loss_sums training evaluates with), the
sweep's generation metrics on data.validation's prompts (all members answer in the same engine batches, greedy),
its adapter's size on disk, and the deploy check's verdict per server (serving_compat, as `lorakit check`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, write_text_atomic
from ..config.sweep import members
from ..data import PreparedData, iter_batches
from ..serving_compat import MISHANDLED, REFUSED, TARGETS, base_config_of, check
from ..train.evaluate import eval_result, loss_sums
from ..train.output_dir import BEST_ADAPTER, SWEEP_FILE
from .answers import EvalExample, answers_of, position_limit, read_examples
from .metrics import needs_reference, scorers


@dataclass
class MemberScore:
    name: str
    settings: dict[str, Any]
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_bytes: int = 0
    deploy: dict[str, str] = field(default_factory=dict)  # target -> ok / note / mishandled / refused

    def verdict(self) -> str:
        bad = [f"{status} by {target}" for target, status in self.deploy.items() if status in (REFUSED, MISHANDLED)]
        return "; ".join(bad) or "ok"


def rank_sweep(config, model, tokenizer, validation: PreparedData | None, output_dir: str | Path, *, dtype=None,
               eval_losses: dict[str, float] | None = None, examples: list[EvalExample] | None = None,
               log: Callable[[str], None] = print) -> list[MemberScore]:
    """Score, rank and record the members of `config.sweep` trained into `model` (a LoraModel holding one adapter
    per member, saved under output_dir/adapter/<member>). `eval_losses`: each member's validation loss from the
    run's final evaluation, where it has one (else it is computed here); `examples`: sweep_examples' prompts for
    sweep.metrics."""
    out = Path(output_dir)
    scores = [MemberScore(m.name, _jsonable(m.settings), None) for m in members(config)]
    names = [s.name for s in scores]
    known = eval_losses or {}
    try:
        for score in scores:
            model.set_adapter(score.name)
            if score.name in known:
                score.eval_loss = known[score.name] if math.isfinite(known[score.name]) else None
            elif validation is not None:
                loss = eval_result(*loss_sums(model, iter_batches(validation, config.train.batch_size,
                                                                  seed=config.train.seed, dtype=dtype),
                                              loss_chunk_tokens=config.train.loss_chunk_tokens)).loss
                score.eval_loss = loss if math.isfinite(loss) else None
        if config.sweep.metrics:
            _generation_metrics(config, model, tokenizer, examples or sweep_examples(config, model, tokenizer), scores)
    finally:
        model.set_adapter(names)
    base = base_config_of(config.model.name_or_path)
    targets = tuple(config.deploy_targets) or TARGETS
    for score, member in zip(scores, members(config)):
        weights = out / "adapter" / score.name / "adapter_model.safetensors"
        score.adapter_bytes = weights.stat().st_size if weights.is_file() else 0
        findings = check(member.lora, targets, base_config=base)
        score.deploy = {t: next((s for s in (REFUSED, MISHANDLED, "note") if any(
            f.target == t and f.severity == s for f in findings)), "ok") for t in targets}
    ranked = rank(scores, config.sweep.rank_by)
    write_text_atomic(out / SWEEP_FILE, json.dumps({
        "rank_by": config.sweep.rank_by, "best": ranked[0].name if ranked else None,
        "members": [{"rank": i + 1, "name": s.name, "settings": s.settings, "eval_loss": s.eval_loss,
                     "metrics": s.metrics, "adapter_bytes": s.adapter_bytes, "deploy": s.deploy,
                     "adapter": str(out / "adapter" / s.name)} for i, s in enumerate(ranked)]},
        indent=1, allow_nan=False) + "\n")
    log(table(ranked, config.sweep.metrics))
    best = out / "adapter" / ranked[0].name
    with atomic_directory(out / BEST_ADAPTER) as staging:
        for path in best.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / path.name)
    log(f"sweep: best {ranked[0].name} by {config.sweep.rank_by}, copied to {out / BEST_ADAPTER}; "
        f"the ranking is in {out / SWEEP_FILE}")
    return ranked


def rank(scores: Sequence[MemberScore], rank_by: str) -> list[MemberScore]:
    """Best first: the lowest eval_loss, or the highest metric; members without the number last, in sweep order."""
    def key(score: MemberScore) -> tuple[int, float]:
        value = score.eval_loss if rank_by == "eval_loss" else score.metrics.get(rank_by)
        if value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, value if rank_by == "eval_loss" else -value)
    return sorted(scores, key=key)  # stable: ties keep the sweep's order


def table(ranked: Sequence[MemberScore], metrics: Sequence[str]) -> str:
    head = ["rank", "member", "eval_loss", *metrics, "adapter", "deploy"]
    rows = [head] + [[str(i + 1), s.name, _num(s.eval_loss), *(_num(s.metrics.get(m)) for m in metrics),
                      _size(s.adapter_bytes), s.verdict()] for i, s in enumerate(ranked)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def sweep_examples(config, model, tokenizer) -> list[EvalExample] | None:
    """data.validation's prompts and references for sweep.metrics (None without metrics): read before training,
    so a record that cannot be scored stops the run before it trains, not after."""
    sweep = config.sweep
    if sweep is None or not sweep.metrics:
        return None
    return read_examples(config.data.validation, tokenizer, config.data, positions=position_limit(model),
                         max_new_tokens=sweep.max_new_tokens, require_reference=needs_reference(sweep.metrics, None))


def _generation_metrics(config, model, tokenizer, examples: list[EvalExample], scores: list[MemberScore]) -> None:
    from ..infer import SamplingParams
    from .compare import Comparison, ModelResult, score

    sweep = config.sweep
    names = [s.name for s in scores]
    answers = answers_of(model, tokenizer, examples, names, SamplingParams(max_tokens=sweep.max_new_tokens),
                         batch_size=max(8, config.train.batch_size * len(names)))
    comparison = Comparison(examples, [ModelResult(n, None, a) for n, a in zip(names, answers)], list(sweep.metrics))
    score(comparison, scorers(sweep.metrics))
    for member, result in zip(scores, comparison.models):
        member.metrics = {m: _finite(result.mean(m)) for m in sweep.metrics}
    model.train()  # the engine put it in eval mode


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _size(size: int) -> str:
    return f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
