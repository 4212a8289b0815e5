"""What `lorakit check` computes for a saved adapter, as data: lorakit's own loader checks (validate_adapter), then
the rules of lorakit.serving_compat for each destination. The CLI prints it; the dashboard shows it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .serving_compat import REFUSED, TARGETS, VLLM_DEFAULT_MAX_LORA_RANK, AdapterFacts, Finding, base_config_of, check


@dataclass
class AdapterCheck:
    directory: Path
    config: object
    """The adapter's LoraConfig."""
    base: dict | None
    """The base's config.json, when its directory is at hand."""
    base_dir: Path | None
    targets: tuple[str, ...]
    findings: list[Finding]

    @property
    def refused(self) -> list[str]:
        return sorted({f.target for f in self.findings if f.severity == REFUSED}, key=self.targets.index)

    @property
    def tensors(self) -> str:
        return (f"loads as lorakit loads it onto {self.base_dir}" if self.base_dir else
                "names, dtypes and values valid; shapes not checked against a base (pass --base)")

    def status(self, target: str) -> str:
        severities = {f.severity for f in self.findings if f.target == target}
        return next((s for s in (REFUSED, "mishandled", "note") if s in severities), "ok")

    def as_dict(self) -> dict:
        return {"adapter": str(self.directory), "architecture": (self.base or {}).get("architectures", [None])[0],
                "tensors": self.tensors, "targets": {t: self.status(t) for t in self.targets},
                "refused": self.refused, "findings": [f.to_dict() for f in self.findings]}


def check_adapter(directory: str | Path, *, base: str | None = None, targets: tuple[str, ...] = TARGETS,
                  max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> AdapterCheck:
    """Check the adapter in `directory` against `targets`; AdapterError for one lorakit itself would refuse."""
    from .base_model import meta_model
    from .lora.io import CONFIG_FILE, read_adapter_config
    from .lora.load import validate_adapter

    directory = Path(directory)
    config = read_adapter_config(directory)  # missing dir, no config, bad JSON or numbers, not LoRA: AdapterError
    base_config, base_dir = read_base(base, config.base_model_name_or_path)
    config, entries = validate_adapter(directory, meta_model(base_dir) if base_dir else None)
    keys = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))  # valid: read_adapter_config passed
    facts = AdapterFacts(shapes={key: entry.shape for key, entry in entries.items()}, config_keys=frozenset(keys))
    targets = tuple(dict.fromkeys(targets))
    findings = check(config, targets, facts=facts, base_config=base_config, max_lora_rank=max_lora_rank,
                     base_gguf=trained_on_gguf(directory, config.base_model_name_or_path))
    return AdapterCheck(directory, config, base_config, base_dir, targets, findings)


def read_base(base: str | None, adapter_base: str | None) -> tuple[dict | None, Path | None]:
    """(config.json, directory) of the base: `base`, else the adapter's base_model_name_or_path when that is a
    local directory; (None, None) when neither (a hub id is never downloaded)."""
    if base is not None:
        path = Path(base)
        config = base_config_of(path)
        if config is None:
            raise ConfigError(f"{path}: no readable config.json; pass the base model's directory", where="--base")
        return config, path
    config = base_config_of(adapter_base) if adapter_base else None
    return config, Path(adapter_base) if config is not None else None


def trained_on_gguf(directory: Path, adapter_base: str | None) -> str | None:
    """The GGUF file the adapter was trained on: its BASE_FILE record (lora/io.py), else a .gguf base path."""
    from .lora.io import BASE_FILE

    try:
        record = json.loads((directory / BASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        return record["path"]
    return adapter_base if adapter_base and adapter_base.lower().endswith(".gguf") else None
