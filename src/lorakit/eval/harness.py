"""EleutherAI's lm-evaluation-harness (lm-eval) on a base model with its adapter applied: `lorakit eval --harness`.

lm-eval's HFLM is given the model object lorakit already built (LoRA layers injected in place), never a name to
load again: integrations that hand over a name or path evaluate the base and silently drop the adapter. That the
adapter really ran is checked, not assumed: for the whole run, hooks watch every forward of the model and every
LoRA layer, and the run fails unless each forward went through each active adapter.
Needs the eval extra: pip install 'lorakit[eval]'.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from ..errors import AdapterError, ConfigError, LorakitError
from ..lora import LoraModel
from ..lora.full_copy import FullCopy
from ..lora.layer import LoraLayer

INSTALL = "pip install 'lorakit[eval]'"


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None  # None where lm-eval gives none ("N/A", or bootstrap_iters=0)


@dataclass
class HarnessResult:
    scores: dict[str, dict[str, Score]]
    """Task (or group) -> metric -> score. A metric under a filter other than lm-eval's "none" is named
    "metric,filter" (e.g. "exact_match,strict-match"), as lm-eval names it."""
    adapters: list[str]
    """The adapters that were applied (checked on every forward); [] for the base model alone."""
    forwards: int
    """Forwards of the model during the run."""
    raw: dict[str, Any]
    """lm-eval's results dict made JSON-safe, without the per-sample records; with a "lorakit" entry saying
    which adapters were applied."""
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    """lm-eval's per-sample records (arguments, responses, metrics) per task, as it returns them."""


def run_harness(model: nn.Module, tokenizer, tasks: list[str], *, include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                log: Callable[[str], None] = print) -> HarnessResult:
    """Run lm-eval `tasks` on `model`: a LoraModel (its active adapters applied) or a plain transformers model
    (the base alone). `include_path`: a directory of task YAMLs of your own (lm-eval's --include_path).
    lm-eval seeds Python's, numpy's and torch's global RNGs, as its own CLI does."""
    lm_eval, HFLM, TaskManager, handle_non_serializable = _lm_eval()
    hf_model, adapters = _unwrap(model)
    if not tasks:
        raise ConfigError("give at least one task name", where="--harness")
    manager = _task_manager(TaskManager, tasks, include_path, log)
    log(f"lm-eval: {', '.join(tasks)} on " + (f"adapter(s) {', '.join(adapters)}" if adapters else "the base model"))
    was_training = model.training
    try:
        lm = _hflm(HFLM, hf_model, copy.deepcopy(tokenizer), batch_size)  # HFLM sets a pad token: not on the caller's
        with _watch_adapters(model, hf_model, adapters) as watch:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, batch_size=batch_size)
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode
    watch.check(adapters)
    samples = out.pop("samples", {})
    out["lorakit"] = {"adapters": adapters, "forwards": watch.forwards}
    raw = json.loads(json.dumps(out, default=handle_non_serializable))
    return HarnessResult(scores=_scores(raw["results"]), adapters=adapters, forwards=watch.forwards, raw=raw,
                         samples=samples)


def format_table(result: HarnessResult) -> str:
    """The scores as an aligned text table, under a line saying what was evaluated."""
    what = (f"adapter(s) {', '.join(result.adapters)} (applied on all {result.forwards} forwards)"
            if result.adapters else "the base model (no adapter)")
    n_samples = result.raw.get("n-samples", {})
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in result.scores.items():
        n = n_samples.get(task, {}).get("effective", "")
        for metric, score in metrics.items():
            stderr = "" if score.stderr is None else f"± {score.stderr:.4f}"
            rows.append((task, metric, f"{score.value:.4f}", stderr, str(n)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([f"lm-eval on {what}", *(line.rstrip() for line in lines)])


# ---- pieces ------------------------------------------------------------------------------------------------------
def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as e:
        error = LorakitError(f"lorakit eval --harness needs lm-eval (EleutherAI's lm-evaluation-harness), which "
                             f"could not be imported ({e}): {INSTALL}")
        error.hint = INSTALL
        raise error from None
    return lm_eval, HFLM, TaskManager, handle_non_serializable


def _unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The transformers model HFLM computes with, and the adapters that must be applied in it."""
    from transformers import PreTrainedModel

    if isinstance(model, LoraModel):
        hf_model = model.model
        adapters = list(dict.fromkeys([*model.active_adapters, *model.merged_adapters]))
        if not adapters:
            loaded = ", ".join(model.adapter_configs) or "none"
            raise AdapterError(f"the LoraModel has no active adapter (loaded: {loaded}): set_adapter() one, or "
                               "pass the base model to evaluate it alone")
    else:
        hf_model, adapters = model, []
        if any(isinstance(m, (LoraLayer, FullCopy)) for m in model.modules()):
            raise AdapterError("this model has LoRA layers injected but is not a LoraModel: pass the LoraModel "
                               "(load_adapter's result), whose active adapters are then applied and checked")
    if not isinstance(hf_model, PreTrainedModel):
        raise ConfigError(f"lm-eval evaluates transformers models; got {type(hf_model).__name__}", where="model")
    return hf_model, adapters


def _task_manager(TaskManager, tasks: list[str], include_path: str | None, log):
    """lm-eval's TaskManager for `tasks`. Indexing lm-eval's own ~15k task YAMLs takes seconds (15 on 2 cores),
    so tasks that are all found in `include_path` are loaded from it alone; any other name, or a group (whose
    members may be lm-eval's), is looked up among all of them."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"{include_path} is not a directory (give a directory of task YAML files)",
                              where="--harness-include")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_subtasks for name in tasks):
            return local
    log("lm-eval: indexing its ~15,000 task files")
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [name for name in tasks if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        problems = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            problems.append(f"unknown task {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else ""))
        error = ConfigError(problems, where="--harness")
        error.hint = ("`lm-eval ls tasks` lists the tasks lm-eval knows; for a task of your own, put its YAML in a "
                      "directory and pass --harness-include DIR" + ("" if include_path is None else
                                                                    f" (searched: {include_path})"))
        raise error
    return manager


def _hflm(HFLM, hf_model: nn.Module, tokenizer, batch_size: int):
    """HFLM over the model object itself. Its constructor re-ties the model's weights (tie_weights), which would
    reach into LoRA wrappers: an adapted embedding has no `.weight` to tie to, and an adapted lm_head would get a
    stray `weight` parameter. The model is already built and tied as it should be, so tying is a no-op here."""
    quiet = logging.getLogger(HFLM.__module__)
    level = quiet.level
    # Its two warnings on this path say that a model object, not a name, was passed: on purpose here.
    quiet.setLevel(logging.ERROR)
    hf_model.tie_weights = lambda *args, **kwargs: None  # an instance attribute, shadowing the method
    try:
        return HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        del hf_model.tie_weights
        quiet.setLevel(level)


class _Watch:
    """What the hooks saw: forwards of the model, and per adapter the forwards that did not go through it."""

    def __init__(self, adapters: list[str]):
        self.forwards = 0
        self.missed = dict.fromkeys(adapters, 0)
        self.pending: set[str] = set()

    def check(self, adapters: list[str]) -> None:
        if not adapters:
            return
        if self.forwards == 0:
            raise AdapterError(f"lm-eval never ran the model that carries adapter(s) {', '.join(adapters)}: it "
                               "computed with some other model, so its scores are not the adapter's")
        missed = {name: n for name, n in self.missed.items() if n}
        if missed:
            raise AdapterError(
                "adapter(s) not applied during the lm-eval run: " + ", ".join(
                    f"{name} skipped in {n} of {self.forwards} forwards" for name, n in missed.items())
                + "; the scores would be the base model's (are the adapters disabled?)")


@contextlib.contextmanager
def _watch_adapters(model: nn.Module, hf_model: nn.Module, adapters: list[str]) -> Iterator[_Watch]:
    """Hooks, removed on exit: each forward of `hf_model` must reach a LoRA layer (or full copy) that applies
    each adapter, counted only where the layer really computes with it (not disabled; active or merged)."""
    watch = _Watch(adapters)

    def start(module, args):
        watch.pending = set(adapters)

    def end(module, args, output):
        watch.forwards += 1
        for name in watch.pending:
            watch.missed[name] += 1

    def applied(layer, args):
        if layer.adapters_disabled:
            return
        if isinstance(layer, FullCopy):
            names = [n for n in layer.active_adapters if n in layer.copies][:1]  # it runs the first one only
        else:
            names = [n for n in (*layer.active_adapters, *layer.merged_adapters) if n in layer.adapters]
        watch.pending.difference_update(names)

    handles = [hf_model.register_forward_pre_hook(start), hf_model.register_forward_hook(end)]
    if adapters:
        handles += [m.register_forward_pre_hook(applied) for m in model.modules()
                    if isinstance(m, (LoraLayer, FullCopy))]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


def _scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Score]]:
    """lm-eval's "metric,filter" / "metric_stderr,filter" keys as Scores; non-numeric entries (name, alias) out."""
    scores: dict[str, dict[str, Score]] = {}
    for task, entries in results.items():
        metrics = {}
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = entries.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else key
            metrics[name] = Score(float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
        if metrics:
            scores[task] = metrics
    return scores
