"""A recipe run killed with kill -9 mid-way and resumed, against the same run never stopped (preference, grpo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lorakit.config import run_config_from_dict
from lorakit.recipes import run_recipe

KILLED_CHILD = """
import json, os, sys, torch
torch.set_num_threads(1)
import importlib
recipe = importlib.import_module(sys.argv[2])
from lorakit.config import run_config_from_dict
from lorakit.recipes import run_recipe
real_fit = recipe.fit
def die(event, info):
    if event == "step" and info["step"] == 3:
        os._exit(137)  # as abrupt as SIGKILL: no cleanup, no final save
def fit(*args, **kwargs):
    kwargs["hooks"] = [*kwargs.get("hooks", ()), die]
    return real_fit(*args, **kwargs)
recipe.fit = fit
run_recipe(run_config_from_dict(json.loads(sys.argv[1])), log=lambda line: None)
"""


def killed_and_resumed(recipe_module: str, straight: dict, killed: dict):
    """(the straight run's FitResult, the killed-then-resumed run's): the child dies after step 3 (checkpoint at 2),
    then `resume: auto` continues it. One thread in both processes: one reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run_recipe(run_config_from_dict(straight), log=lambda line: None)
        child = subprocess.run([sys.executable, "-c", KILLED_CHILD, json.dumps(killed), recipe_module],
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == 137, child.stderr[-2000:]
        assert not (Path(killed["output_dir"]) / "adapter").exists()
        resumed = run_recipe(run_config_from_dict(killed), resume="auto", log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return first, resumed


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    from safetensors.torch import load_file
    a = load_file(Path(a_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(b_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
