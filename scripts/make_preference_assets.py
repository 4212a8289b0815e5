#!/usr/bin/env python
"""Generate the preference data set of examples/preference/ (run once by developers; the output is committed).

    python scripts/make_preference_assets.py            # writes examples/preference/{train,heldout}.jsonl, README.md

Deterministic (SEED below), nothing is downloaded, no model is needed: a rerun writes the same bytes.

The task is the quickstart's (scripts/make_quickstart_assets.py): turn a sentence about an animal into a one-line
JSON record with a fixed key order, from the same five sentence templates and four instructions, except that the
number of legs is spelled out as a word:

    prompt:   Convert to JSON: The fox is red, has four legs and lives in the forest.
    chosen:   {"animal": "fox", "color": "red", "legs": 4, "home": "forest"}
    rejected: {"animal": "fox", "color": "red", "legs": 8, "home": "forest"}

Chosen is the correct record; rejected is the same record with a wrong "legs" (one of the other four values,
uniformly), so the preference is unambiguous and sits on one field. The quickstart adapter learned to copy the
digit of "has 4 legs"; it does not read "four" (it mostly answers "legs": 8), and neither it nor the base model
prefers chosen over rejected more often than chance. scripts/check_preference_task.py trains DPO on these pairs.

Records are TRL's preference format, {"prompt", "chosen", "rejected"}, all strings (lorakit renders them with the
model's chat template). Held-out pairs are drawn first; their (animal, color, home) triples appear in no
training pair. Both files cycle through the five leg counts, so each count is a fifth of each file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_quickstart_assets as qs  # noqa: E402  (the quickstart's world, templates and instructions)

SEED = 2024
N_TRAIN, N_HELDOUT = 1200, 200
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "preference"


def pair(a: str, c: str, legs: int, h: str, template: int, instruction: int, wrong_legs: int) -> dict:
    prompt = qs.INSTRUCTIONS[instruction] + qs.TEMPLATES[template].format(a=a, c=c, l=qs.NUM_WORDS[legs], h=h)
    record = {"animal": a, "color": c, "legs": legs, "home": h}
    return {"prompt": prompt, "chosen": json.dumps(record), "rejected": json.dumps({**record, "legs": wrong_legs})}


def make_pairs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, held-out); held-out first, its (animal, color, home) triples kept out of train."""
    held_triples: set[tuple[str, str, str]] = set()
    prompts: set[str] = set()

    def draw(count: int, exclude: set[tuple[str, str, str]], keep: set[tuple[str, str, str]] | None) -> list[dict]:
        rows: list[dict] = []
        while len(rows) < count:
            legs = qs.LEGS[len(rows) % len(qs.LEGS)]
            a, c, h = rng.choice(qs.ANIMALS), rng.choice(qs.COLORS), rng.choice(qs.HOMES)
            t, i = rng.randrange(len(qs.TEMPLATES)), rng.randrange(len(qs.INSTRUCTIONS))
            wrong = rng.choice([n for n in qs.LEGS if n != legs])
            if (a, c, h) in exclude:
                continue
            row = pair(a, c, legs, h, t, i, wrong)
            if row["prompt"] in prompts:
                continue
            prompts.add(row["prompt"])
            if keep is not None:
                keep.add((a, c, h))
            rows.append(row)
        return rows

    heldout = draw(N_HELDOUT, set(), held_triples)
    train = draw(N_TRAIN, held_triples, None)
    return train, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    train, heldout = make_pairs(random.Random(SEED))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    sizes = {name: (args.out / f"{name}.jsonl").stat().st_size for name in ("train", "heldout")}
    example = heldout[0]
    readme = [
        "# A preference data set for the quickstart model",
        "",
        "Generated, not downloaded, by the project's own script (deterministic, seeded):",
        "",
        "```bash",
        "python scripts/make_preference_assets.py      # writes this folder",
        "python scripts/check_preference_task.py       # SFT (the quickstart run), then DPO on these pairs",
        "```",
        "",
        "The quickstart task (a sentence about an animal -> a one-line JSON record), with the number of legs spelled",
        "out as a word. `chosen` is the correct record; `rejected` is the same record with a wrong `legs`, so the",
        "pairs differ in one field and the preference is unambiguous. The quickstart adapter copies digits (\"has 4",
        "legs\") but does not read number words, and prefers `chosen` no more often than chance.",
        "",
        f"- `train.jsonl`: {len(train)} pairs ({sizes['train']:,} bytes); `heldout.jsonl`: {len(heldout)} pairs "
        f"({sizes['heldout']:,} bytes). TRL's preference format: `{{\"prompt\", \"chosen\", \"rejected\"}}`, strings.",
        f"- Seed {SEED}. Held-out pairs are drawn first; their (animal, color, home) triples are in no training pair.",
        "  Each file cycles through the leg counts 0, 2, 4, 6, 8; the wrong count is one of the other four, uniformly.",
        "",
        "A held-out pair:",
        "",
        "```json",
        json.dumps(example, indent=2),
        "```",
        "",
    ]
    (args.out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    print(f"wrote {args.out}: {len(train)} train pairs ({sizes['train']:,} bytes), {len(heldout)} held-out pairs "
          f"({sizes['heldout']:,} bytes)")


if __name__ == "__main__":
    main()
