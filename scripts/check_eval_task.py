#!/usr/bin/env python
"""Did the fine-tune work? A sweep on the quickstart model, then `lorakit eval --compare` of the base and the members.

    python scripts/check_eval_task.py [--out DIR] [--steps 1000]

1. One run with `sweep:` trains the quickstart's task (sentence -> JSON record, shipped model and data) at two
   learning rates (3e-3, the quickstart's, and 3e-4) as two adapters over the same batches, then ranks them by the
   json_fields metric on the held-out records (greedy answers) in OUT/sweep/sweep.json.
2. `lorakit eval` (the CLI, in-process) scores the base and both members on the same 100 held-out records with
   exact, json_valid, json_fields and rouge_l and writes OUT/report.html; what it prints is shown (ASSETS: the
   quickstart's shipped files, RUN: OUT/sweep), then it runs again with --json for the checks below.
Exits 1 unless the best member beats the base on json_fields by at least 0.5, the sweep's ranking agrees with the
eval table, and the report was written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

LRS = (3e-3, 3e-4)
METRICS = "exact,json_valid,json_fields,rouge_l"
MAX_NEW_TOKENS = 48
MARGIN = 0.5


def train_sweep(out: Path, steps: int, log=print) -> Path:
    """The quickstart run with a sweep over the learning rate, ranked by json_fields; returns its output_dir."""
    import dataclasses

    from lorakit.config import SweepConfig
    from lorakit.config.sweep import expand
    from lorakit.quickstart.run import quickstart_config
    from lorakit.recipes import run_recipe

    config = quickstart_config(out / "sweep", max_steps=steps)
    config = dataclasses.replace(config, sweep=SweepConfig(lr=list(LRS), metrics=["json_fields"],
                                                           rank_by="json_fields", max_new_tokens=MAX_NEW_TOKENS))
    run_recipe(expand(config), resume="never", overwrite=True, log=log)
    return out / "sweep"


def compare(run: Path, report: Path, limit: int | None = None, show=None) -> dict:
    """`lorakit eval --compare base MEMBER...` on the quickstart's held-out records; its --json output. With
    `show` (a print function), the same command without --json runs first and what it prints is shown."""
    from lorakit.cli import main
    from lorakit.quickstart.run import ASSETS

    members = sorted(p for p in (run / "adapter").iterdir() if p.is_dir())
    argv = ["eval", "--model", str(ASSETS / "model"), "--data", str(ASSETS / "data" / "val.jsonl"), "--metrics",
            METRICS, "--compare", "base", *map(str, members), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--dtype", "float32", "--report", str(report)] + (["--limit", str(limit)] if limit else [])
    if show:
        printed = _run(main, argv + ["--show", "1"])
        command = " ".join(argv + ["--show", "1"])
        show(f"$ lorakit {command}\n{printed}".replace(str(ASSETS), "ASSETS").replace(str(run), "RUN")
             .replace(str(report.parent), "OUT").rstrip())
    return json.loads(_run(main, argv + ["--json"]).strip().splitlines()[-1])


def _run(main, argv: list[str]) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"lorakit eval failed (exit {code})")
    return printed.getvalue()


def verdict(result: dict, ranking: dict, margin: float = MARGIN) -> list[str]:
    """What must hold (the best member `margin` above the base on json_fields, the rankings agreeing); an empty
    list when it all does."""
    scores = {m["name"].split("/")[-1]: m["scores"] for m in result["models"]}
    best = ranking["best"]
    problems = []
    if scores[best]["json_fields"] < scores["base"]["json_fields"] + margin:
        problems.append(f"best member {best}: json_fields {scores[best]['json_fields']:.2f} is not {margin} above the "
                        f"base's {scores['base']['json_fields']:.2f}")
    members = [m["name"] for m in ranking["members"]]
    by_eval = sorted(members, key=lambda n: -scores[n]["json_fields"])
    if by_eval[0] != best and scores[by_eval[0]]["json_fields"] != scores[best]["json_fields"]:
        problems.append(f"the sweep ranked {best} first, lorakit eval ranks {by_eval[0]} first")
    for member in ranking["members"]:
        if member["metrics"]["json_fields"] != scores[member["name"]]["json_fields"]:
            problems.append(f"{member['name']}: sweep.json says json_fields {member['metrics']['json_fields']}, "
                            f"lorakit eval {scores[member['name']]['json_fields']}")
    return problems


def table(result: dict) -> str:
    metrics = result["metrics"]
    lines = ["model".ljust(22) + "".join(m.rjust(12) for m in metrics) + "loss".rjust(9)]
    for model in result["models"]:
        lines.append(model["name"][-22:].ljust(22) + "".join(f"{model['scores'][m]:12.3f}" for m in metrics)
                     + f"{model['loss']:9.4f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/eval-check"), help="work directory (its sweep is replaced)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps of the sweep (the quickstart's 1000)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N held-out records")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 1.2M parameters: a second thread gains little (scripts/check_preference_task.py)
    started = time.perf_counter()
    run = train_sweep(args.out, args.steps, log=lambda line: print(line) if line.startswith(("eval", "rank", "1 ", "2 ", "sweep")) else None)
    trained = time.perf_counter() - started
    result = compare(run, args.out / "report.html", args.limit, show=print)
    ranking = json.loads((run / "sweep.json").read_text())
    print(table(result))
    print(f"sweep ({args.steps} steps, 2 members) {trained:.0f} s; eval of 3 models on {result['examples']} records "
          f"{time.perf_counter() - started - trained:.0f} s; report: {args.out / 'report.html'}")
    problems = verdict(result, ranking) + ([] if (args.out / "report.html").is_file() else ["no report written"])
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"OK: best member {ranking['best']} (by json_fields) beats the base by at least {MARGIN}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
