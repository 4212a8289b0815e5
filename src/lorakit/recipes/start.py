"""What every recipe does first: seed, settle resume against overwrite, and check the output directory."""

from __future__ import annotations

import random
from typing import Callable

import torch

from ..config import RunConfig
from ..train.output_dir import check_output_dir
from ..train.runtime import Runtime


def start_run(config: RunConfig, resume: str | None, overwrite: bool, runtime: Runtime,
              log: Callable[[str], None]) -> str:
    """Seed torch and random (the LoRA A init draws from them) and return the resume mode this run uses
    (`resume` over train.resume; overwrite starts over). The output directory is checked by every process (the
    same files), so a refusal stops them all before anything loads; only rank 0 probes it by writing."""
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    if overwrite and resume is None and config.train.resume != "never":
        log(f"overwrite: starting over, so the run config's train.resume: {config.train.resume} does not apply")
        resume = "never"
    resume = str(config.train.resume if resume is None else resume)
    check_output_dir(config.output_dir, resume=resume, overwrite=overwrite, probe=runtime.is_main)
    return resume
