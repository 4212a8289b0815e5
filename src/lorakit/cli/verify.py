"""`lorakit verify --model BASE --adapter DIR --data val.jsonl`: the adapter through each deployment format,
against lorakit itself (eval/verify.py): one table, or --json."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .loading import model_config


def add_parser(sub) -> None:
    verify = sub.add_parser(
        "verify", help="what each export of an adapter costs: greedy answers and perplexity against lorakit",
        description="Export the adapter (merged transformers model, merged GGUF in each --quants, the base GGUF "
                    "plus a GGUF LoRA) and ask each the same held-out prompts and records as lorakit with the "
                    "adapter unmerged: the share of greedy answers equal token for token, and the perplexity of "
                    "the records' answers. GGUF files run in llama.cpp (llama-cpp-python).")
    verify.add_argument("--model", "--base", dest="model", required=True,
                        help="base model directory or .gguf file (the file the adapter was trained on)")
    verify.add_argument("--adapter", required=True, help="adapter directory")
    verify.add_argument("--data", required=True, help="held-out records: their prompts are answered greedily, "
                                                      "their answers scored for perplexity")
    verify.add_argument("--quants", default="f16,q8_0,q4_k_m",
                        help="merged GGUF variants, comma-separated (f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; "
                             "default f16,q8_0,q4_k_m); empty: none")
    verify.add_argument("--limit", type=int, default=20, help="records used (default 20)")
    verify.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length (default 32)")
    verify.add_argument("--keep", help="write the exports into this new directory and keep them (default: a "
                                        "temporary one, removed)")
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    verify.set_defaults(handler=run)


def run(args) -> int:
    from ..base_model import gguf_file_of, load_base_model
    from ..data import DataOptions, prepare
    from ..errors import ConfigError
    from ..eval import verify
    from ..eval.answers import answers_of, position_limit, read_examples
    from ..export import merge_to_directory, write_gguf, write_lora_gguf
    from ..export.gguf import QUANTS
    from ..infer import SamplingParams
    from ..infer.engine import eos_ids
    from ..lora import load_adapter

    quants = [q for q in args.quants.split(",") if q]
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise ConfigError(f"--quants {','.join(bad)}: choose from {', '.join(QUANTS)}", where="lorakit verify")
    if args.keep and Path(args.keep).exists():
        raise ConfigError(f"--keep {args.keep}: exists; name a new directory (nothing is overwritten)",
                          where="lorakit verify")
    log = (lambda _: None) if args.json else print
    config = model_config(args.model, "float32", None)
    loaded = load_base_model(config, log=log)
    tokenizer, base_gguf = loaded.tokenizer, gguf_file_of(config)
    positions = position_limit(loaded.model)
    examples = read_examples(args.data, tokenizer, DataOptions(), positions=positions,
                             max_new_tokens=args.max_new_tokens, limit=args.limit)
    data = prepare(args.data, tokenizer, DataOptions())
    scored = [(e.input_ids, e.labels) for e in data.examples[:args.limit]]
    prompts = [ex.ids for ex in examples]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    stop = eos_ids(tokenizer, loaded.model)
    n_ctx = max([len(p) for p in prompts] + [len(ids) for ids, _ in scored]) + args.max_new_tokens + 8

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        lora = load_adapter(loaded.model, args.adapter)
        reference = verify.FormatResult("lorakit", args.adapter, None)
        reference.answers = _ids(answers_of(lora, tokenizer, examples, ["default"], params, batch_size=8)[0])
        nll, reference.tokens = verify.torch_nll(lora, scored)
        reference.loss = nll / max(reference.tokens, 1)
        log(f"lorakit (adapter unmerged): perplexity {reference.perplexity:.4f}")
        write_lora_gguf(lora, work / "adapter.gguf")
        del lora, loaded

        results = []
        merged_dir = merge_to_directory(load_base_model(config), args.adapter, work / "merged", overwrite=True)
        merged = load_base_model(model_config(str(merged_dir), "float32", None))
        hf = verify.FormatResult("hf", str(merged_dir), sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")))
        hf.answers = _ids(answers_of(merged.model, tokenizer, examples, [None], params, batch_size=8)[0])
        nll, hf.tokens = verify.torch_nll(merged.model, scored)
        hf.loss = nll / max(hf.tokens, 1)
        results.append(hf)
        del merged
        log(f"hf (merged): perplexity {hf.perplexity:.4f}")

        runs = [(f"gguf-{q}", write_gguf(merged_dir, work / f"merged.{q}.gguf", quant=q), None) for q in quants]
        if base_gguf is not None:
            runs.append((f"lora-gguf on {base_gguf.path.name}", base_gguf.path, work / "adapter.gguf"))
        elif (Path(args.model) / "config.json").is_file():
            runs.append(("lora-gguf on base f16", write_gguf(args.model, work / "base.f16.gguf"), work / "adapter.gguf"))
        for name, model_file, lora_file in runs:
            answers, nll, tokens = verify.run_llama_cpp(model_file, lora_file, prompts, scored, stop=stop,
                                                        max_new_tokens=args.max_new_tokens, n_ctx=n_ctx, work=work)
            size = model_file.stat().st_size + (lora_file.stat().st_size if lora_file else 0)
            result = verify.FormatResult(name, str(model_file), size, answers, nll / max(tokens, 1), tokens)
            results.append(result)
            log(f"{name}: perplexity {result.perplexity:.4f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(verify.as_json(reference, results, len(prompts)), allow_nan=False))
    else:
        print(f"{len(prompts)} prompts and {len(scored)} records from {args.data}; greedy, {args.max_new_tokens} new "
              "tokens at most; the reference is lorakit with the adapter unmerged (float32)")
        print(verify.table(reference, results))
        if args.keep:
            print(f"exports kept in {work}")
    return 0


def _ids(answers) -> list[list[int]]:
    return [list(answer.token_ids) for answer in answers]
