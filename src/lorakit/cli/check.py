"""`lorakit check ADAPTER_DIR --for vllm ...`: would each server load this adapter, and compute what was trained?

Reads adapter_config.json and the safetensors header (names and shapes, never the tensors; a pickled
adapter_model.bin is refused, not unpickled), and the base model's config.json when one is at hand. The rules
live in lorakit.deploy. Exit code: 0 when no target refuses the adapter, 1 when one does (EXIT_REFUSED), 2 for
bad input through the CLI's error boundary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..deploy import REFUSED, TARGETS, VLLM_DEFAULT_MAX_LORA_RANK, AdapterFacts, Finding, base_config_of, check
from ..errors import AdapterError, ConfigError

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


def read_facts(directory: Path) -> AdapterFacts:
    """Tensor names and shapes from the safetensors header, and the config's keys; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    from ..lora.io import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise AdapterError(f"{directory / PICKLE_FILE}: lorakit check reads safetensors only (a pickle can run "
                               f"code); convert it to {WEIGHTS_FILE} with a trusted tool")
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights}: not a valid safetensors file ({err})") from None
    keys = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))  # read_adapter_config parsed it first
    return AdapterFacts(shapes=shapes, config_keys=frozenset(keys))


def read_base(base: str | None, adapter_base: str | None) -> dict | None:
    if base is not None:
        path = Path(base)
        config = base_config_of(path)
        if config is None:
            raise ConfigError(f"{path}: no readable config.json; pass the base model's directory", where="--base")
        return config
    return base_config_of(adapter_base) if adapter_base else None  # a hub id reads as None: nothing downloaded


def run(args: argparse.Namespace) -> int:
    from ..lora.io import read_adapter_config

    directory = Path(args.adapter)
    config = read_adapter_config(directory)  # missing dir, no config, bad JSON, not LoRA: AdapterError
    facts = read_facts(directory)
    base = read_base(args.base, config.base_model_name_or_path)
    targets = tuple(dict.fromkeys(args.targets or TARGETS))
    findings = check(config, targets, facts=facts, base_config=base, max_lora_rank=args.max_lora_rank)
    refused = sorted({f.target for f in findings if f.severity == REFUSED}, key=targets.index)
    if args.json:
        print(json.dumps({"adapter": str(directory), "architecture": (base or {}).get("architectures", [None])[0],
                          "targets": {t: _status(t, findings) for t in targets}, "refused": refused,
                          "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        arch = (base or {}).get("architectures", ["unknown (pass --base)"])[0]
        print(f"{directory}: r={config.r}, lora_alpha={config.lora_alpha}, base {arch}")
        for target in targets:
            print(f"{target}: {_status(target, findings)}")
            for f in (f for f in findings if f.target == target):
                print(f"  {f.severity}: {f.problem}\n    fix: {f.fix}\n    source: {f.source}")
        print(f"refused by: {', '.join(refused)}" if refused else "no target refuses this adapter")
    return EXIT_REFUSED if refused else 0


def _status(target: str, findings: list[Finding]) -> str:
    severities = {f.severity for f in findings if f.target == target}
    return next((s for s in (REFUSED, "mishandled", "note") if s in severities), "ok")
