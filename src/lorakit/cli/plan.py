"""`lorakit plan run.yaml`: the predicted peak memory and a rough time per step, before training.

The estimate itself is lorakit.plan.estimate (what is counted) and lorakit.plan.check (the machine's side); this module
only reads the arguments and prints.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="predict a run's peak memory (and a rough time per step) without loading "
                                       "the model", description=__doc__)
    plan.add_argument("config", help="the run config (YAML); only model.name_or_path's config.json is read")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set train.batch_size=8 (repeatable)")
    plan.add_argument("--budget", help="a memory size (8GB, 7.5GiB): print the largest batch_size for each "
                                       "max_seq_len whose predicted peak fits it")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    plan.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_run_config
    from ..plan.check import STEP_EFFICIENCY, gb, parse_size, plan_report, table

    budget = parse_size(args.budget) if args.budget else None
    config = load_run_config(args.config, args.overrides)
    report, plan = plan_report(config, budget)
    if args.json:
        print(json.dumps(report))
        return 0
    m, s = plan.memory, plan.memory.setup
    have, where, dtype, rows = report["available_bytes"], report["available_from"], report["dtype"], report["budget"]
    rows = [(r["max_seq_len"], r["batch_size"]) for r in rows]
    flops, rate, seconds = report["step_flops"], report["matmul_flops_per_s"], report["seconds_per_step"]
    shape = plan.shape
    print(f"memory plan for {args.config}: {shape.model_type}, {shape.layers} layers x {shape.hidden} wide, "
          f"vocab {shape.vocab}; {dtype}{f', {s.bits}-bit base' if s.bits else ''} on {s.device}; "
          f"batch {s.batch_size} x {s.seq_len} tokens")
    print(table(m))
    if have is not None:
        print(f"available: {gb(have)} ({where}): {'fits' if m.peak <= have else 'does NOT fit'}")
    print(f"time: ~{seconds:.2g} s per optimizer step (rough): {flops / 1e12:.2f} TFLOP of model work at "
          f"{STEP_EFFICIENCY:.0%} of this device's {dtype} matmul rate, {rate / 1e12:.2f} TFLOP/s measured just now")
    if rows:
        print(f"largest batch_size within {gb(budget)} (predicted peak):")
        for seq, batch in rows:
            mark = "  <- max_seq_len" if seq == s.seq_len else ""
            tokens = f"{batch} x {seq} = {batch * seq} tokens" if batch else "does not fit even at batch 1"
            print(f"  max_seq_len {seq:>6}: batch_size {batch:>4}  ({tokens}){mark}")
    return 0
