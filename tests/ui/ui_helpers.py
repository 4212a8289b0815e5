"""Shared pieces of the dashboard tests: a runs root with one short run of the quickstart model, trained in-process
by the CLI, and a client of the dashboard's app."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from lorakit.cli import main
from lorakit.ui.app import create_ui_app
from lorakit.ui.paths import QUICKSTART_ASSETS, Roots

QUICKSTART = {"model.name_or_path": str(QUICKSTART_ASSETS / "model"),
              "data.train": str(QUICKSTART_ASSETS / "data" / "train.jsonl"),
              "data.validation": str(QUICKSTART_ASSETS / "data" / "val.jsonl")}
# The form's values for a short quickstart run (fp32: what the quickstart trains in).
FORM = {**QUICKSTART, "model.dtype": "float32", "lora.r": 8, "lora.target_modules": "all-linear",
        "data.max_seq_len": 96, "train.max_steps": 30, "train.batch_size": 8, "train.lr": 0.003, "train.eval_every": 15,
        "train.save_every": 15, "train.log_every": 10}


def nested(values: dict) -> dict:
    raw: dict = {}
    for key, value in values.items():
        section, _, field = key.rpartition(".")
        raw.setdefault(section, {})[field] = value
    return raw


def train_run(root: Path, name: str, **changes) -> Path:
    """Train `name` under `root` in this process (the CLI's train command) and return its directory."""
    raw = nested({**FORM, **changes})
    raw["output_dir"] = str(root / name)
    config = root.parent / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    return root / name


def client(root: Path, **options) -> TestClient:
    return TestClient(create_ui_app(Roots(root), **options))


def wait_until(predicate, seconds: float = 120, what: str = "the condition") -> None:
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
