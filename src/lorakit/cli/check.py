"""`lorakit check ADAPTER_DIR --for vllm ...`: would each server load this adapter, and compute what was trained?

First the adapter gets every check lorakit's own loader makes (lorakit.lora.load.validate_adapter: the config's
numbers, the safetensors header, tensor names, dtypes and values, and, when the base model's directory is at
hand, names and shapes against the base built on the meta device from its config.json; no base weight is
read, and a pickled adapter_model.bin is refused, not unpickled). Then the rules of lorakit.serving_compat. Exit code:
0 when no target refuses the adapter, 1 when one does (EXIT_REFUSED), 2 for bad input, an adapter lorakit
itself would refuse included, through the CLI's error boundary.
"""

from __future__ import annotations

import argparse
import json

from ..serving_compat import TARGETS, VLLM_DEFAULT_MAX_LORA_RANK

EXIT_REFUSED = 1


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "check", help="will vLLM, llama.cpp, Ollama or PEFT load this adapter as trained? (exit 1 if one refuses it)",
        description="Check a saved adapter against what each destination accepts: refused (it errors out), "
                    "mishandled (it loads but computes something else) or note. Exit 0: no target refuses it; "
                    "1: one does; 2: bad input.")
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--for", dest="targets", action="append", choices=TARGETS, metavar="TARGET",
                        help=f"a destination: {', '.join(TARGETS)} (repeatable; default: all)")
    parser.add_argument("--base", default=None, help="base model directory (its config.json gives the architecture); "
                        "default: the adapter's base_model_name_or_path when that is a local directory")
    parser.add_argument("--max-lora-rank", type=int, default=VLLM_DEFAULT_MAX_LORA_RANK,
                        help="vLLM's --max-lora-rank, if you start it with one (default: vLLM's 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_check import check_adapter

    result = check_adapter(args.adapter, base=args.base, targets=tuple(args.targets or TARGETS),
                           max_lora_rank=args.max_lora_rank)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        config, base = result.config, result.base
        arch = (base or {}).get("architectures", ["unknown (pass --base)"])[0]
        print(f"{result.directory}: r={config.r}, lora_alpha={config.lora_alpha}, base {arch}\ntensors: {result.tensors}")
        for target in result.targets:
            print(f"{target}: {result.status(target)}")
            for f in (f for f in result.findings if f.target == target):
                print(f"  {f.severity}: {f.problem}\n    fix: {f.fix}\n    source: {f.source}")
        print(f"refused by: {', '.join(result.refused)}" if result.refused else "no target refuses this adapter")
    return EXIT_REFUSED if result.refused else 0
