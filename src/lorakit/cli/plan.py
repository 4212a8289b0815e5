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
    from ..plan.check import (available_bytes, budget_table, gb, matmul_rate, parse_size, plan_run,
                                    step_flops, table, STEP_EFFICIENCY)

    budget = parse_size(args.budget) if args.budget else None
    config = load_run_config(args.config, args.overrides)
    plan = plan_run(config)
    m, s = plan.memory, plan.memory.setup
    have, where = available_bytes(s)
    rate = matmul_rate(s)
    flops = step_flops(plan) * config.train.grad_accum
    seconds = flops / (rate * STEP_EFFICIENCY)
    rows = budget_table(plan, budget) if budget is not None else []
    dtype = str(s.dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps({
            "peak_bytes": m.peak, "phase": m.phase, "device": s.device, "dtype": dtype,
            "batch_size": s.batch_size, "max_seq_len": s.seq_len, "quantization_bits": s.bits,
            "items": [{"name": i.name, "bytes": i.bytes, "note": i.note} for i in m.items], "notes": m.notes,
            "available_bytes": have, "available_from": where, "fits": None if have is None else m.peak <= have,
            "step_flops": flops, "matmul_flops_per_s": rate, "step_efficiency": STEP_EFFICIENCY,
            "seconds_per_step": seconds,
            "budget_bytes": budget, "budget": [{"max_seq_len": seq, "batch_size": b} for seq, b in rows]}))
        return 0
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
