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
from pathlib import Path

from ..serving_compat import REFUSED, TARGETS, VLLM_DEFAULT_MAX_LORA_RANK, AdapterFacts, Finding, base_config_of, check
from ..errors import ConfigError

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


def read_base(base: str | None, adapter_base: str | None) -> tuple[dict | None, Path | None]:
    """(config.json, directory) of the base: --base, else the adapter's base_model_name_or_path when that is a
    local directory; (None, None) when neither (a hub id is never downloaded)."""
    if base is not None:
        path = Path(base)
        config = base_config_of(path)
        if config is None:
            raise ConfigError(f"{path}: no readable config.json; pass the base model's directory", where="--base")
        return config, path
    config = base_config_of(adapter_base) if adapter_base else None
    return config, Path(adapter_base) if config is not None else None


def run(args: argparse.Namespace) -> int:
    from ..base_model import meta_model
    from ..lora.io import CONFIG_FILE, read_adapter_config
    from ..lora.load import validate_adapter

    directory = Path(args.adapter)
    config = read_adapter_config(directory)  # missing dir, no config, bad JSON or numbers, not LoRA: AdapterError
    base, base_dir = read_base(args.base, config.base_model_name_or_path)
    config, entries = validate_adapter(directory, meta_model(base_dir) if base_dir else None)
    keys = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))  # valid: read_adapter_config passed
    facts = AdapterFacts(shapes={key: entry.shape for key, entry in entries.items()}, config_keys=frozenset(keys))
    targets = tuple(dict.fromkeys(args.targets or TARGETS))
    findings = check(config, targets, facts=facts, base_config=base, max_lora_rank=args.max_lora_rank,
                     base_gguf=trained_on_gguf(directory, config.base_model_name_or_path))
    refused = sorted({f.target for f in findings if f.severity == REFUSED}, key=targets.index)
    tensors = (f"loads as lorakit loads it onto {base_dir}" if base_dir else
               "names, dtypes and values valid; shapes not checked against a base (pass --base)")
    if args.json:
        print(json.dumps({"adapter": str(directory), "architecture": (base or {}).get("architectures", [None])[0],
                          "tensors": tensors, "targets": {t: _status(t, findings) for t in targets},
                          "refused": refused, "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        arch = (base or {}).get("architectures", ["unknown (pass --base)"])[0]
        print(f"{directory}: r={config.r}, lora_alpha={config.lora_alpha}, base {arch}\ntensors: {tensors}")
        for target in targets:
            print(f"{target}: {_status(target, findings)}")
            for f in (f for f in findings if f.target == target):
                print(f"  {f.severity}: {f.problem}\n    fix: {f.fix}\n    source: {f.source}")
        print(f"refused by: {', '.join(refused)}" if refused else "no target refuses this adapter")
    return EXIT_REFUSED if refused else 0


def trained_on_gguf(directory: Path, adapter_base: str | None) -> str | None:
    """The GGUF file the adapter was trained on: its BASE_FILE record (lora/io.py), else a .gguf base path."""
    from ..lora.io import BASE_FILE

    try:
        record = json.loads((directory / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        return record["path"]
    return adapter_base if adapter_base and adapter_base.lower().endswith(".gguf") else None


def _status(target: str, findings: list[Finding]) -> str:
    severities = {f.severity for f in findings if f.target == target}
    return next((s for s in (REFUSED, "mishandled", "note") if s in severities), "ok")
