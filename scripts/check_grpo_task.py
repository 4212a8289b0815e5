#!/usr/bin/env python
"""GRPO on the quickstart model: a verifiable reward rises on held-out prompts.

    python scripts/check_grpo_task.py [--out DIR] [--seed 0] [--steps 60]

The prompts are examples/preference's (scripts/make_preference_assets.py): the quickstart task, "Convert to JSON: A
yellow deer with zero legs lives in the sea." No answers are used: the reward is verifiable from the completion
alone, the built-in json_schema: 1 when the completion is a JSON object with exactly the fields animal, color,
legs (an integer) and home, else 0.

1. SFT: the quickstart run shortened to 200 steps and merged (about 40 s on 2 cores): a model that has started to
   write the records but often breaks them (invalid JSON, a wrong or missing key).
2. Before: greedy answers of that model to 100 held-out prompts, scored by the reward.
3. GRPO with lorakit's Python API (run_config_from_dict + run_recipe): a fresh r=8 adapter, each step 4 prompts x
   8 completions sampled by lorakit's engine from the model being trained, at temperature 0.2 (this 1.2M model's
   next-token distributions have a long flat tail: at 0.3 and above most samples are garbage, so few groups hold
   a valid record to learn from).
4. After: the same greedy answers with the adapter. Exits 1 unless the held-out reward is at least 0.9 and rose by
   at least 0.1.
The run's metrics.jsonl, loss.png (loss and mean reward per step, held-out reward at each evaluation) and
samples/ (completions with their rewards) are in OUT/grpo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import check_preference_task as task  # noqa: E402  (the task's data, SFT stage, loading and greedy scoring)

STEPS, PROMPTS_PER_STEP, GENERATIONS, LR, RANK, MAX_COMPLETION, TEMPERATURE, SFT_STEPS = 60, 4, 8, 1e-3, 8, 48, 0.2, 200
SCHEMA = {"type": "object", "required": ["animal", "color", "legs", "home"], "additionalProperties": False,
          "properties": {"animal": {"type": "string"}, "color": {"type": "string"}, "legs": {"type": "integer"},
                         "home": {"type": "string"}}}
HELD_OUT = 100


def write_prompts(out: Path) -> tuple[Path, Path]:
    """The task's prompts with their correct record as `answer` (train from train.jsonl, held out from heldout)."""
    paths = []
    for name, rows in (("train", task._read(task.DATA / "train.jsonl")),
                       ("heldout", task._read(task.DATA / "heldout.jsonl")[:HELD_OUT])):
        path = out / f"{name}_prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]}) + "\n" for r in rows),
                        encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def schema_valid(answers: list[str]) -> float:
    """The reward's mean over `answers` (the share that are records of the schema)."""
    import jsonschema
    valid = 0
    for answer in answers:
        try:
            valid += jsonschema.Draft202012Validator(SCHEMA).is_valid(json.loads(answer.strip()))
        except json.JSONDecodeError:
            pass
    return valid / len(answers)


def train_grpo(out: Path, sft_model: Path, train: Path, heldout: Path, *, steps: int, seed: int,
               log: Callable[[str], None], temperature: float = TEMPERATURE, lr: float = LR) -> Path:
    from lorakit.config import run_config_from_dict
    from lorakit.recipes import run_recipe

    config = run_config_from_dict({
        "model": {"name_or_path": str(sft_model), "dtype": "float32"},
        "objective": "grpo",
        "lora": {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": "all-linear"},
        "data": {"train": str(train), "validation": str(heldout), "max_seq_len": task.MAX_SEQ_LEN},
        "train": {"max_steps": steps, "batch_size": PROMPTS_PER_STEP, "lr": lr, "lr_schedule": "constant",
                  "eval_every": max(1, steps // 4), "save_every": steps, "keep_checkpoints": 1,
                  "log_every": max(1, steps // 8), "seed": seed},
        "rl": {"num_generations": GENERATIONS, "temperature": temperature, "max_completion_len": MAX_COMPLETION,
               "loss_type": "dapo", "sample_every": max(1, steps // 4),
               "rewards": [{"function": "json_schema", "schema": str(out / "record.schema.json")}]},
        "output_dir": str(out / "grpo"),
    })
    return run_recipe(config, resume="never", overwrite=True, log=log).adapter_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grpo-check"), help="work directory (its grpo/ is replaced)")
    ap.add_argument("--sft", type=Path, help="a merged SFT model to start from (default: OUT/sft/merged, trained here)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=TEMPERATURE, help="sampling temperature of the rollouts")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the model has 1.2M parameters)")
    ap.add_argument("--verbose", action="store_true", help="print the training log (default: step and eval lines)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, seconds = time.perf_counter(), {}

    if args.sft is not None:
        sft_model = args.sft
    elif (out / "sft" / "merged" / "config.json").is_file():
        sft_model = out / "sft" / "merged"
    else:
        print(f"1/4 SFT: the quickstart run shortened to {SFT_STEPS} steps, merged")
        sft_model = task.train_sft(out, SFT_STEPS, lambda line: None)
    print(f"1/4 SFT model: {sft_model}")
    seconds["sft"] = time.perf_counter() - started
    (out / "record.schema.json").write_text(json.dumps(SCHEMA, indent=1) + "\n", encoding="utf-8")

    train, heldout = write_prompts(out)
    rows = task._read(heldout)
    prompts = [r["prompt"] for r in rows]
    t0 = time.perf_counter()
    tok, sft = task._load(sft_model)
    before = schema_valid(task.greedy(sft, tok, prompts, MAX_COMPLETION))
    print(f"2/4 before: greedy answers of the SFT model to {len(rows)} held-out prompts: reward {before:.2f}")
    seconds["before"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"3/4 GRPO: {args.steps} steps of {PROMPTS_PER_STEP} prompts x {GENERATIONS} completions at temperature "
          f"{args.temperature:g}, lr {args.lr:g}, "
          f"fresh r{RANK} adapter, reward exact_match (seed {args.seed})")

    def show(line: str) -> None:
        if args.verbose or line.startswith(("step ", "eval at step")):
            print("    " + line, flush=True)

    adapter = train_grpo(out, sft_model, train, heldout, steps=args.steps, seed=args.seed, log=show,
                         temperature=args.temperature, lr=args.lr)
    seconds["grpo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok, policy = task._load(sft_model, adapter)
    answers = task.greedy(policy, tok, prompts, MAX_COMPLETION)
    after = schema_valid(answers)
    seconds["after"] = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_reward"]) for r in metrics if "eval_reward" in r]
    train_rewards = [r["reward"] for r in metrics if "reward" in r]
    k = max(1, len(train_rewards) // 10)
    print(f"\nheld-out prompts: {len(rows)}; reward = json_schema (a JSON object with exactly animal, color, legs "
          "(integer), home)")
    print(f"greedy answers' reward: SFT {before:.2f} -> GRPO {after:.2f}")
    print("held-out eval_reward (the run's, greedy, lorakit's engine) by step: "
          + ", ".join(f"{s}: {v:.2f}" for s, v in evals))
    print(f"training reward (sampled at temperature {args.temperature:g}, 8 per prompt): first {k} steps "
          f"{sum(train_rewards[:k]) / k:.3f}, last {k} steps {sum(train_rewards[-k:]) / k:.3f}")
    print(f"e.g. {prompts[0]!r} -> {answers[0]!r}")
    print(f"plot: {out / 'grpo' / 'loss.png'}; samples: {out / 'grpo' / 'samples'}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    if not (after >= 0.9 and after >= before + 0.1):
        print(f"FAIL: held-out reward {before:.2f} -> {after:.2f} (needs >= 0.9 and a rise of 0.1 or more)")
        return 1
    print(f"OK: held-out reward {before:.2f} -> {after:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
