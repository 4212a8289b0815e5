"""`lorakit` subcommands. The library never prints errors or exits; this is the one place that turns
its exceptions into `error: ...` plus `hint: ...` and an exit code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import AdapterError, CheckpointError, ConfigError, DataError, LorakitError
from ..signals import Terminated
from .loading import chosen_task, load, model_config

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

HINTS = {
    ConfigError: "fix the field named above; `lorakit train --help` lists every field with its allowed values",
    DataError: "fix the record at the location shown, or set data.skip_bad_records: true to skip and count bad records",
    AdapterError: "check that the adapter directory was written by lorakit or PEFT for this base model",
    CheckpointError: "resume from another checkpoint (--resume PATH), or start over with --overwrite (or another "
                     "output_dir)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return args.handler(args)
    except LorakitError as err:
        print(f"error: {err}", file=sys.stderr)
        hint = err.hint or next((h for kind, h in HINTS.items() if isinstance(err, kind)), None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):
            print("terminated (SIGTERM)", file=sys.stderr)
            return stop.exit_code
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


QUANTIZE_HELP = "load the base in 4-bit NF4 or 8-bit (bitsandbytes: pip install 'lorakit[quant]')"
MERGE_DTYPE_HELP = ("dtype of the merged model (default auto: the checkpoint's own, from its config.json or "
                    "safetensors); each weight is merged in float32 and rounded once")
OVERWRITE_HELP = ("replace --out if it exists, but only a directory an earlier lorakit merge/export wrote (it lists "
                  "its files in lorakit_merge.json); anything else there is refused, never deleted")


def build_parser() -> argparse.ArgumentParser:
    from ..config import field_reference

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, merge, generate.")
    sub = parser.add_subparsers(metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter from a YAML run config",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="run config fields (see examples/run.yaml):\n\n" + field_reference())
    train.add_argument("config", nargs="?", help="the run config (YAML)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set train.lr=2e-4 (repeatable)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|never|PATH",
                       help="continue the run in output_dir: auto (the default when given bare: the latest intact "
                       "checkpoint), never, or a checkpoint directory")
    train.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds a previous "
                       "run: deletes lorakit's outputs there (checkpoints, adapter, metrics, ...), nothing else")
    train.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                       help="resume although FIELD (e.g. train.lr, or a whole section: lora) differs from the "
                       "checkpoint's settings (repeatable; max_steps, epochs, logging and saving may always change)")
    train.add_argument("--force", action="store_true", help="train even where the memory plan predicts the run "
                       "does not fit (the same as --set train.memory_check=false)")
    train.set_defaults(handler=_train)

    from .evaluate import add_parser as add_eval_parser

    add_eval_parser(sub, QUANTIZE_HELP)  # lorakit eval: loss, generation metrics, --compare, --harness (cli/evaluate.py)

    merge = sub.add_parser("merge", help="fold an adapter into its base and save a plain transformers model")
    merge.add_argument("--model", "--base", dest="model", required=True, help="base model directory or hub id")
    merge.add_argument("--adapter", required=True, help="adapter directory")
    merge.add_argument("--out", required=True, help="output directory for the merged model")
    merge.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help=MERGE_DTYPE_HELP)
    merge.add_argument("--quantize", type=int, choices=[4, 8], help="merge into the 4/8-bit base the adapter was "
                       "trained on (QLoRA): its dequantized weights plus the adapter, written in 16 bits")
    merge.add_argument("--max-shard-size", default="2GB")
    merge.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    merge.set_defaults(handler=_merge)

    export = sub.add_parser("export", help="write a deployable model: a merged transformers checkpoint (hf) or one "
                                           "GGUF file for llama.cpp (gguf)")
    export.add_argument("--model", "--base", dest="model", required=True, help="base model directory, hub id or "
                        ".gguf file (the file the adapter was trained on)")
    export.add_argument("--adapter", required=True, help="adapter directory")
    export.add_argument("--format", default="hf", choices=["hf", "gguf", "ollama", "lora-gguf"],
                        help="hf: a transformers model directory; gguf: one .gguf file (llama, mistral, qwen2, qwen3, "
                             "gemma2, gemma3, phi3); "
                             "ollama: a directory with the .gguf and a Modelfile for `ollama create` (for a "
                             ".gguf base: the adapter as a GGUF LoRA, FROM that file and ADAPTER); "
                             "lora-gguf: the adapter alone, for llama.cpp's --lora on a GGUF of the base")
    export.add_argument("--out", required=True, help="output directory (hf, ollama) or .gguf file (gguf, lora-gguf)")
    export.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
                        help="GGUF weight type (gguf, ollama); q4_0 and the k-quants are made by llama.cpp's own "
                             "quantizer (llama-cpp-python)")
    export.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help=MERGE_DTYPE_HELP + "; gguf, ollama: auto merges in float32, then --quant")
    export.add_argument("--quantize", type=int, choices=[4, 8], help="the adapter was trained on a 4/8-bit base: "
                        "merge into the dequantized weights of that base (the output is 16-bit)")
    export.add_argument("--max-shard-size", default="2GB", help="hf only")
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + "; a .gguf file only if it is "
                        "GGUF, an ollama directory only if it holds nothing but a Modelfile and .gguf files")
    export.set_defaults(handler=_export)

    from .check import add_parser as add_check_parser

    add_check_parser(sub)  # lorakit check ADAPTER --for vllm|llama.cpp|ollama|peft (cli/check.py)
    from .verify import add_parser as add_verify_parser

    add_verify_parser(sub)  # lorakit verify: each export format against lorakit (cli/verify.py)
    from .plan import add_parser as add_plan_parser

    add_plan_parser(sub)  # lorakit plan run.yaml [--budget 8GB] [--json] (cli/plan.py)
    from .ui import add_parser as add_ui_parser

    add_ui_parser(sub)  # lorakit ui --root RUNS: the web dashboard (cli/ui.py, lorakit/ui/)

    data = sub.add_parser("data", help="look at training data as the model will see it")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    inspect = data_sub.add_parser("inspect", help="render examples with the tokens that carry loss marked, "
                                                  "and warn about examples that train the wrong thing")
    inspect.add_argument("config", help="the run config (model.name_or_path gives the tokenizer; no weights load)")
    inspect.add_argument("-n", "--examples", type=int, default=3, help="how many examples to render (all are checked)")
    inspect.add_argument("--split", choices=["train", "validation"], default="train")
    inspect.add_argument("--task", help="for a config with tasks: the task whose data to inspect")
    inspect.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="auto: colour on a terminal, [[ ]] markers when piped")
    inspect.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    inspect.set_defaults(handler=_data_inspect)

    quick = sub.add_parser("quickstart", help="the whole workflow on a shipped tiny model and dataset, offline")
    quick.add_argument("--out", default="lorakit-quickstart", help="output directory (adapter, metrics, merged model)")
    quick.add_argument("--steps", type=int, default=1000, help="training steps")
    quick.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart in --out")
    quick.set_defaults(handler=_quickstart)

    for name, helptext in (("generate", "generate a completion for one prompt, streamed"),
                           ("chat", "chat interactively (the tokenizer's chat template)")):
        p = sub.add_parser(name, help=helptext)
        if name == "generate":
            p.add_argument("prompt", help="the prompt text")
            p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn")
        else:
            p.add_argument("--system", default=None, help="a system message")
        p.add_argument("--model", required=True, help="base model directory or hub id")
        p.add_argument("--adapter", help="adapter directory")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
        p.add_argument("--quantize", type=int, choices=[4, 8], help=QUANTIZE_HELP)
        p.set_defaults(handler=_generate if name == "generate" else _chat)

    serve = sub.add_parser("serve", help="serve the base and adapters over an OpenAI-compatible HTTP API "
                           "(pip install 'lorakit[serve]')")
    serve.add_argument("--model", required=True, help="base model directory or hub id")
    serve.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                       help="load an adapter at startup, served as model NAME (repeatable)")
    serve.add_argument("--adapter-dir", default=None, help="serve the adapters inside this directory: a request "
                       "naming one loads it on first use; POST /v1/adapters loads and DELETE unloads; off without it")
    serve.add_argument("--max-loras", type=int, default=None, help="adapters resident at most: loading one more "
                       "evicts the least recently used one loaded on first use that no request is using")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                       "(default: $LORAKIT_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the base model's id in requests "
                       "(default: the model directory's name, or the hub id)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together at most")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts get 400")
    serve.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    serve.set_defaults(handler=_serve)
    return parser


# ---- handlers -------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from ..config import load_run_config
    from ..recipes import run_recipe

    if args.config is None and args.resume and Path(args.resume).suffix in (".yaml", ".yml"):
        args.config, args.resume = args.resume, "auto"  # `train --resume run.yaml`: a bare --resume took the config
    if args.config is None:
        raise ConfigError("give the run config: lorakit train run.yaml [--resume] [--set FIELD=VALUE ...]",
                          where="lorakit train")
    config = load_run_config(args.config, args.overrides + (["train.memory_check=false"] if args.force else []))
    run_recipe(config, resume=args.resume, overwrite=args.overwrite, allow_change=args.allow_change,
                 log=print)  # fit logs its own closing summary
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from ..base_model import load_tokenizer
    from ..config import load_run_config
    from ..data import prepare
    from ..data.inspect import preference_report, report
    from ..data.preference import Lengths, prepare_preference
    from ..data.templates import resolve_template

    config = load_run_config(args.config, args.overrides)
    task = chosen_task(config, args.task)
    files = task or config.data
    source = files.train if args.split == "train" else files.validation
    if source is None:
        field = f"task {task.name}'s validation" if task else "data.validation"
        raise ConfigError(f"{field}: not set in this config; inspect --split train instead", where="run config")
    tokenizer = load_tokenizer(config.model)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    stop_ids = {tokenizer.eos_token_id} - {None}
    if config.objective in ("dpo", "orpo", "kto"):  # pairs, or KTO's labelled completions
        pref = config.preference
        data = prepare_preference(source, tokenizer, config.data, paired=config.objective != "kto",
                                  lengths=Lengths(config.data.max_seq_len, pref.max_prompt_len, pref.max_completion_len))
        stop_ids |= resolve_template(tokenizer, config.data.template).end_of_turn_ids
        print(preference_report(data, tokenizer, count=args.examples, stop_ids=stop_ids, color=color))
        return 0
    data = prepare(source, tokenizer, config.data)  # the data section is a DataOptions
    if data.summary.format != "text":
        stop_ids |= resolve_template(tokenizer, config.data.template).end_of_turn_ids
    print(report(data, tokenizer, count=args.examples, stop_ids=stop_ids, color=color))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from ..quickstart import run_quickstart

    run_quickstart(args.out, max_steps=args.steps, overwrite=args.overwrite, log=print)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..base_model import load_base_model
    from ..export import merge_to_directory
    from ..export.hf import merge_dtypes
    from ..export.outputs import check_out

    check_out(args.out, "hf", overwrite=args.overwrite, inputs=(args.model, args.adapter))  # before the long part
    load, dtype = (args.dtype, None) if args.quantize else merge_dtypes(args.model, args.dtype)
    loaded = load_base_model(model_config(args.model, load, args.quantize, device="cpu"), log=print)
    print(loaded.describe())
    out = merge_to_directory(loaded, args.adapter, args.out, max_shard_size=args.max_shard_size,
                             overwrite=args.overwrite, dtype=dtype)
    print(f"merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    if loaded.quantization:
        print(f"note: the merged model is 16-bit: the {loaded.quantization.split(',')[0]} base weights dequantized plus "
              "the adapter. Quantizing it again rounds the adapter's small update away in part; to run on a "
              "quantized base without that loss, load the base quantized and keep the adapter separate.")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        return _merge(args)
    import shutil
    import tempfile

    from ..base_model import gguf_file_of, load_base_model
    from ..export import merge_to_directory, write_gguf, write_lora_gguf

    from ..export.outputs import check_out
    from ..serving_compat import OLLAMA_ENGINE_NO_LORA

    out = Path(args.out)
    check_out(out, args.format if args.format == "ollama" else "gguf", overwrite=args.overwrite,
              inputs=(args.model, args.adapter))
    if args.format == "lora-gguf":
        write_lora_gguf(load(args.model, args.adapter, "float32").model, out, overwrite=args.overwrite)
        print(f"GGUF LoRA adapter written to {out} (llama.cpp: llama-cli -m BASE.gguf --lora {out})")
        return 0
    base_gguf = gguf_file_of(model_config(args.model, "float32", None))
    if args.format == "ollama" and base_gguf is not None and base_gguf.architecture in OLLAMA_ENGINE_NO_LORA.values():
        print(f"note: Ollama runs {base_gguf.architecture} models on its own engine, which refuses adapters when the "
              "model loads ('loras are not yet implemented'): writing the merged model instead of FROM "
              f"{base_gguf.path} + ADAPTER (lorakit verify shows what --quant {args.quant} costs)")
    elif args.format == "ollama" and base_gguf is not None:  # the user's own file stays the base: ADAPTER on it
        from ..export.ollama import write_ollama_adapter_directory

        loaded = load(args.model, args.adapter, "float32")
        note = write_ollama_adapter_directory(loaded.model, loaded.tokenizer, base_gguf.path, out,
                                              overwrite=args.overwrite)
        print(f"Ollama model written to {out}: FROM {base_gguf.path} with ADAPTER adapter.gguf "
              f"(ollama create NAME -f {out / 'Modelfile'})")
        if note:
            print(f"note: {note}")
        return 0
    dtype = "float32" if args.dtype == "auto" else args.dtype
    loaded = load_base_model(model_config(args.model, dtype, args.quantize, device="cpu"), log=print)
    print(loaded.describe())
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        merged = merge_to_directory(loaded, args.adapter, work / "merged", overwrite=True)
        if args.format == "gguf":
            write_gguf(merged, out, quant=args.quant, name=Path(args.adapter).name, overwrite=args.overwrite)
            print(f"GGUF ({args.quant}) written to {out} (llama.cpp: llama-cli -m {out})")
            return 0
        from ..export.ollama import write_ollama_directory

        note = write_ollama_directory(merged, out, quant=args.quant, name=Path(args.adapter).name,
                                      overwrite=args.overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Ollama model written to {out} (ollama create NAME -f {out / 'Modelfile'})")
    if note:
        print(f"note: {note}")
    return 0


def _engine(loaded, args):
    """The serving engine over the loaded model, one request at a time (what `lorakit serve` batches)."""
    from ..infer import Engine

    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or 1 << 20
    return Engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_queue=1,
                  max_prompt_tokens=limit, max_new_tokens=max(1, args.max_new_tokens))


def _stream(engine, loaded, input_ids, args) -> str:
    """Print the completion of `input_ids` as it is generated; returns its text."""
    from ..infer import SamplingParams
    from ..lora import LoraModel

    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    adapter = "default" if isinstance(loaded.model, LoraModel) else None
    handle = engine.submit(input_ids[0].tolist(), adapter, params)
    pieces = []
    for event in handle:
        print(event.text, end="", flush=True)
        pieces.append(event.text)
    print()
    return "".join(pieces)


def _chat_ids(tokenizer, messages):
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template; use `lorakit generate` with a plain prompt",
                          where="lorakit chat")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def _generate(args: argparse.Namespace) -> int:
    loaded = load(args.model, args.adapter, args.dtype, args.quantize)
    if args.chat_template:
        ids = _chat_ids(loaded.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        ids = loaded.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    with _engine(loaded, args) as engine:
        _stream(engine, loaded, ids, args)
    return 0


def _chat(args: argparse.Namespace) -> int:
    loaded = load(args.model, args.adapter, args.dtype, args.quantize)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    with _engine(loaded, args) as engine:
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
            messages.append({"role": "user", "content": text})
            reply = _stream(engine, loaded, _chat_ids(loaded.tokenizer, messages), args)
            messages.append({"role": "assistant", "content": reply})
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from ..serve import require_server_dependencies

    require_server_dependencies()
    from ..serve.server import ServeOptions, parse_adapter_args, run

    for flag in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1", where="lorakit serve")
    if args.max_loras is not None and (args.max_loras < 1 or not args.adapter_dir):
        raise ConfigError("--max-loras must be at least 1, and needs --adapter-dir (the adapters it loads and evicts)",
                          where="lorakit serve")
    options = ServeOptions(model=args.model, adapters=parse_adapter_args(args.adapters), adapter_dir=args.adapter_dir,
                           host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"),
                           dtype=args.dtype, device=args.device, served_model_name=args.served_model_name,
                           max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                           max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                           max_loras=args.max_loras)
    run(options, log_fn=print)
    return 0
