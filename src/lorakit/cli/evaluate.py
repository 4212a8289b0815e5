"""`lorakit eval`: did the fine-tune work?

Without --metrics: the loss and perplexity of the base or an adapter on a data file (as before). With --metrics:
greedy (or seeded sampled) answers to every prompt of the data file, scored against the reference answers; with
--compare the base, any number of adapters and merged model directories answer the same prompts and one table
compares them (--json for machines, --report FILE.html for people). --harness runs lm-evaluation-harness tasks on
the base with the adapter applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LorakitError
from .loading import chosen_task, load, model_config

GENERATION_BATCH = 16
LOSS_BATCH = 4


def add_parser(sub, quantize_help: str) -> None:
    evaluate = sub.add_parser(
        "eval", help="score a model, adapters side by side, on a dataset: loss, generation metrics, lm-eval tasks",
        description="Loss and perplexity by default; --metrics scores generated answers against the data's "
                    "reference answers; --compare puts the base, adapters and merged models side by side; "
                    "--harness runs lm-evaluation-harness tasks.")
    evaluate.add_argument("config", nargs="?", help="a run config (its model, data.validation or data.train, output "
                          "adapter; its run's loss curves go into --report)")
    evaluate.add_argument("--model", help="base model directory or hub id")
    evaluate.add_argument("--adapter", help="adapter directory (omit for the base model alone)")
    evaluate.add_argument("--data", help="data file to evaluate on")
    evaluate.add_argument("--task", help="for a config with tasks: the task whose adapter (adapter/<task>) and "
                          "validation data to use")
    evaluate.add_argument("--batch-size", type=int, default=None,
                          help=f"rows per forward (default {LOSS_BATCH} for the loss, {GENERATION_BATCH} answers "
                          "decoded together for --metrics)")
    evaluate.add_argument("--max-seq-len", type=int, default=None)
    evaluate.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"])
    evaluate.add_argument("--quantize", type=int, choices=[4, 8], help=quantize_help + "; default: the run config's")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, tokens; "
                          "with --metrics every model's scores and every answer); a non-finite loss is an error (exit 2)")
    gen = evaluate.add_argument_group("generation metrics")
    gen.add_argument("--metrics", action="append", default=[], metavar="NAMES",
                     help="score generated answers: exact, contains, regex, json_valid, json_fields, rouge_l "
                     "(comma-separated or repeated; rouge_l needs pip install 'lorakit[eval]')")
    gen.add_argument("--regex", default=None, metavar="PATTERN", help="the regex metric's pattern: with a capturing "
                     "group, the group must equal the reference (e.g. '#### (\\d+)'); without, it must be found")
    gen.add_argument("--reference", default=None, metavar="COLUMN", help="the column holding the reference answer "
                     "(default: completion, the final assistant turn, alpaca's output, or answer)")
    gen.add_argument("--compare", nargs="*", default=None, metavar="MODEL",
                     help="models side by side: base, adapter directories, merged model directories (bare "
                     "--compare: the base and --adapter)")
    gen.add_argument("--report", default=None, metavar="FILE.html", help="also write a self-contained HTML page: "
                     "the table, every answer side by side with differences marked, the run's loss curves")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (example i draws with seed + i)")
    gen.add_argument("--limit", type=int, default=None, help="score only the first N prompts (the loss: the first N "
                     "records)")
    gen.add_argument("--show", type=int, default=3, help="how many differing answers to print (default 3)")
    gen.add_argument("--template", default=None, help="chat template for the prompts: auto (the tokenizer's), "
                     "chatml, llama3, alpaca, plain (base models); default: the run config's, else auto")
    harness = evaluate.add_argument_group("lm-evaluation-harness (pip install 'lorakit[eval]')")
    harness.add_argument("--harness", default=None, metavar="TASKS", help="comma-separated lm-eval task names "
                         "(e.g. hellaswag,arc_easy; downloads their data) run with the adapter applied")
    harness.add_argument("--harness-include", default=None, metavar="DIR", help="a directory of your own task YAMLs")
    harness.add_argument("--num-fewshot", type=int, default=None)
    evaluate.set_defaults(handler=run)


@dataclass
class Inputs:
    model: str
    adapter: str | None
    data: str | None
    options: Any  # DataOptions
    quantize: Any
    run_dir: Path | None  # a run config's output_dir, for its loss curves


def run(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "max_new_tokens", "limit", "show"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "show" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'show' else 1}, got {value}",
                              where="lorakit eval")
    inputs = _inputs(args)
    if args.harness:
        return _harness(args, inputs)
    if not (args.metrics or args.regex) and args.compare is None and not args.report:
        return _loss(args, inputs)
    return _generation(args, inputs)


def _inputs(args: argparse.Namespace) -> Inputs:
    from ..config import load_run_config
    from ..data import DataOptions

    if args.config:
        config = load_run_config(args.config)
        task = chosen_task(config, args.task)
        files = task or config.data
        trained = Path(config.output_dir) / "adapter" / (task.name if task else "")
        inputs = Inputs(model=args.model or config.model.name_or_path,
                        adapter=args.adapter or (str(trained) if trained.is_dir() else None),
                        data=args.data or files.validation or files.train,
                        options=config.data,  # the data section is a DataOptions
                        quantize=config.model.quantization if args.quantize is None else args.quantize,
                        run_dir=Path(config.output_dir))
    else:
        if not args.model or not (args.data or args.harness):
            raise ConfigError("give a run config, or --model and --data (--harness needs no --data)",
                              where="lorakit eval")
        inputs = Inputs(args.model, args.adapter, args.data, DataOptions(), args.quantize, None)
    if args.max_seq_len:
        inputs.options = dataclasses.replace(inputs.options, max_seq_len=args.max_seq_len)
    if args.template:
        inputs.options = dataclasses.replace(inputs.options, template=args.template)
    return inputs


# ---- loss -----------------------------------------------------------------------------------------------
def _loss(args: argparse.Namespace, inputs: Inputs) -> int:
    from ..data import iter_batches, prepare
    from ..train.evaluate import evaluate

    loaded = load(inputs.model, inputs.adapter, args.dtype, inputs.quantize)
    data = prepare(inputs.data, loaded.tokenizer, inputs.options)
    result = evaluate(loaded.model, iter_batches(data, args.batch_size or LOSS_BATCH, dtype=loaded.dtype))
    if not result.tokens:
        raise LorakitError(f"{inputs.data}: no token carries loss (every label is masked): nothing to evaluate")
    if not math.isfinite(result.loss):
        what = f"the model with adapter {inputs.adapter}" if inputs.adapter else "the base model"
        raise LorakitError(f"the loss is {result.loss} over {result.tokens} tokens: {what} computes non-finite "
                           "logits on this data; check the adapter (lorakit check ADAPTER --base MODEL) and the "
                           "base weights, or evaluate in --dtype float32 (float16 overflows easily)")
    if args.json:  # strict JSON: a perplexity too large for a float (loss > 709) is null
        perplexity = result.perplexity if math.isfinite(result.perplexity) else None
        print(json.dumps({"loss": result.loss, "perplexity": perplexity, "tokens": result.tokens}, allow_nan=False))
    else:
        print(f"{data.summary.line()}\nloss {result.loss:.4f}  perplexity {result.perplexity:.3f}  ({result.tokens} tokens)")
    return 0


# ---- generation metrics and comparison ------------------------------------------------------------------
def _contenders(args: argparse.Namespace, adapter: str | None) -> list[str | None]:
    """The models to score, in table order: None for the base, else an adapter or merged model directory."""
    if args.compare is None:
        return [adapter]
    if not args.compare:
        if adapter is None:
            raise ConfigError("bare --compare compares the base with --adapter (or the run's adapter); give an "
                              "adapter, or list the models: --compare base ADAPTER_DIR ...", where="lorakit eval")
        return [None, adapter]
    paths: list[str | None] = []
    for item in args.compare:
        path = None if item == "base" else item
        if path is not None:
            directory = Path(path)
            if not ((directory / "adapter_config.json").is_file() or (directory / "config.json").is_file()):
                raise ConfigError(f"--compare {item}: not an adapter directory (adapter_config.json) nor a model "
                                  "directory (config.json); use base for the base model", where="lorakit eval")
        if path in paths:
            raise ConfigError(f"--compare lists {item} twice", where="lorakit eval")
        paths.append(path)
    return paths


def _generation(args: argparse.Namespace, inputs: Inputs) -> int:
    from ..eval.answers import position_limit, read_examples
    from ..eval.compare import Comparison, ModelResult, as_json, differences, field_table, score, table, unique_names
    from ..eval.metrics import needs_reference, parse_metrics, scorers
    from ..infer import SamplingParams

    metrics = parse_metrics(args.metrics or ([] if args.regex else ["exact"]), args.regex)
    if args.report:
        from ..eval.report import check_report_target

        check_report_target(args.report, inputs=[p for p in (inputs.data, args.config) if p])
    score_with = scorers(metrics, args.regex)  # a missing rouge-score fails here, before any model loads
    paths = _contenders(args, inputs.adapter)
    names = unique_names(paths)
    adapters = [p for p in paths if p is None or (Path(p) / "adapter_config.json").is_file()]
    merged = [p for p in paths if p not in adapters]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed if args.temperature > 0 else None)
    if params.problems():
        raise ConfigError("; ".join(params.problems()), where="lorakit eval")

    log = (lambda _: None) if args.json else print
    loaded, engine_names = _load_with_adapters(inputs, args, [p for p in adapters if p is not None], log)
    limit = position_limit(loaded.model)
    examples = read_examples(inputs.data, loaded.tokenizer, inputs.options, positions=limit,
                             max_new_tokens=args.max_new_tokens,
                             reference_column=args.reference, require_reference=needs_reference(metrics, args.regex),
                             limit=args.limit)
    results: dict[str | None, ModelResult] = {}
    answers = _answers(loaded, examples, [None if p is None else engine_names[p] for p in adapters], params, args)
    for path, model_answers in zip(adapters, answers):
        results[path] = ModelResult(names[paths.index(path)], path, model_answers)
    loss_note = _losses(loaded, inputs, args, {p: results[p] for p in adapters}, engine_names)
    del loaded
    for path in merged:  # merged / exported model directories: loaded one at a time, after the others
        other = _load_merged(path, args, log)
        _check_same_vocabulary(other, examples, path)
        results[path] = ModelResult(names[paths.index(path)], path, _answers(other, examples, [None], params, args)[0])
        _losses(other, inputs, args, {None: results[path]}, {})
        del other

    comparison = Comparison(examples, [results[p] for p in paths], metrics, loss_note=loss_note)
    score(comparison, score_with)
    if args.report:
        from ..eval.report import write_report
        from ..train.metrics import read_metrics

        runs = {}
        for path in [str(inputs.run_dir / "adapter")] if inputs.run_dir else [p for p in paths if p]:
            metrics_file = _run_metrics(Path(path))
            if metrics_file:
                runs[str(metrics_file.parent)] = read_metrics(metrics_file)
        settings = {"data": str(inputs.data), "base": inputs.model, "prompts": str(len(examples)),
                    "decoding": "greedy" if args.temperature == 0 else
                    f"temperature {args.temperature}, top_p {args.top_p}, seed {args.seed}",
                    "max new tokens": str(args.max_new_tokens)}
        out = write_report(comparison, args.report, title=f"lorakit eval: {Path(str(inputs.data)).name}",
                           settings=settings, runs=runs)
        log(f"report written to {out}")
    if args.json:
        print(json.dumps(as_json(comparison), allow_nan=False, ensure_ascii=False))
        return 0
    print(f"{len(examples)} prompts from {inputs.data}, "
          + ("greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature}, seed {args.seed})"))
    print(table(comparison))
    for extra in (field_table(comparison), comparison.loss_note and f"loss: {comparison.loss_note}",
                  differences(comparison, args.show)):
        if extra:
            print(extra)
    if comparison.errors:
        print(f"{len(comparison.errors)} scores could not be computed (left out of the means); the first: "
              f"{comparison.errors[0]}", file=sys.stderr)
    return 0


def _load_with_adapters(inputs: Inputs, args, adapters: list[str], log):
    """The base with every adapter loaded under an engine name of its own (a0, a1, ...)."""
    from ..base_model import load_base_model
    from ..lora import load_adapter

    loaded = load_base_model(model_config(inputs.model, args.dtype, inputs.quantize), log=log)
    names = {}
    for i, path in enumerate(adapters):
        names[path] = f"a{i}"
        loaded.model = load_adapter(loaded.model, path, names[path])
    return loaded, names


def _load_merged(path: str, args, log):
    from ..base_model import load_base_model

    return load_base_model(model_config(path, args.dtype, None), log=log)


def _check_same_vocabulary(loaded, examples, path: str) -> None:
    size = loaded.model.get_input_embeddings().num_embeddings
    if max(max(ex.ids) for ex in examples) >= size:
        raise ConfigError(f"--compare {path}: its vocabulary ({size} tokens) is not the base's; a merged model of "
                          "the same base has the same tokenizer", where="lorakit eval")


def _answers(loaded, examples, adapters, params, args):
    from ..eval.answers import answers_of

    return answers_of(loaded.model, loaded.tokenizer, examples, adapters, params,
                      batch_size=args.batch_size or GENERATION_BATCH)


def _losses(loaded, inputs: Inputs, args, results: dict, engine_names: dict) -> str | None:
    """Each model's loss on the data (base: adapters disabled). Returns why there is none where the data has no
    answers to score (prompt-only records), else None."""
    import contextlib

    from ..data import iter_batches, prepare
    from ..lora import LoraModel
    from ..train.evaluate import evaluate

    try:
        data = prepare(inputs.data, loaded.tokenizer, inputs.options)
    except DataError as err:
        return f"not computed: the data is not trainable text ({err})"
    if args.limit:  # the same first records the answers are scored on
        data = dataclasses.replace(data, examples=data.examples[:args.limit])
    model = loaded.model
    for path, result in results.items():
        if isinstance(model, LoraModel) and path is not None:
            model.set_adapter(engine_names[path])
            scope = contextlib.nullcontext()
        else:
            scope = model.disable_adapters() if isinstance(model, LoraModel) else contextlib.nullcontext()
        with scope:
            scored = evaluate(model, iter_batches(data, LOSS_BATCH, dtype=loaded.dtype))
        if scored.tokens:
            result.loss, result.perplexity, result.tokens = scored.loss, scored.perplexity, scored.tokens
    return None


def _run_metrics(adapter: Path) -> Path | None:
    """The metrics.jsonl of the run that wrote `adapter` (output_dir/adapter or output_dir/adapter/<task>)."""
    for directory in (adapter.parent, adapter.parent.parent):
        if (directory / "metrics.jsonl").is_file():
            return directory / "metrics.jsonl"
    return None


# ---- lm-evaluation-harness ------------------------------------------------------------------------------
def _harness(args: argparse.Namespace, inputs: Inputs) -> int:
    from ..eval.harness import format_table, run_harness

    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--harness: name at least one task", where="lorakit eval")
    log = (lambda _: None) if args.json else print
    loaded = load(inputs.model, inputs.adapter, args.dtype, inputs.quantize)
    result = run_harness(loaded.model, loaded.tokenizer, tasks, include_path=args.harness_include, limit=args.limit,
                         num_fewshot=args.num_fewshot, batch_size=args.batch_size or 8, log=log)
    if args.json:
        print(json.dumps(result.raw, allow_nan=False, default=str))
    else:
        print(format_table(result))
    return 0
