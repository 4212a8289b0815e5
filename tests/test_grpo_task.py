"""GRPO on the quickstart model raises a verifiable reward on held-out prompts: a shortened
scripts/check_grpo_task.py (the full check runs 60 GRPO steps and scores all 100 held-out prompts). Slow: it
trains the real quickstart model, 200 SFT steps then GRPO."""

import json
import sys

import torch

from script_helpers import SCRIPTS, load_script


def test_grpo_on_the_quickstart_model_raises_the_held_out_reward(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check = load_script("check_grpo_task")
        task = check.task
        sft = task.train_sft(tmp_path, check.SFT_STEPS, lambda line: None)
        (tmp_path / "record.schema.json").write_text(json.dumps(check.SCHEMA), encoding="utf-8")
        train, heldout = check.write_prompts(tmp_path)
        prompts = [r["prompt"] for r in task._read(heldout)][:40]
        tokenizer, model = task._load(sft)
        before = check.schema_valid(task.greedy(model, tokenizer, prompts, check.MAX_COMPLETION))
        adapter = check.train_grpo(tmp_path, sft, train, heldout, steps=20, seed=0, log=lambda line: None)
        tokenizer, policy = task._load(sft, adapter)
        after = check.schema_valid(task.greedy(policy, tokenizer, prompts, check.MAX_COMPLETION))
    finally:
        torch.set_num_threads(threads)
        for name in ("check_grpo_task", "check_preference_task"):
            sys.modules.pop(name, None)
    assert before < 0.85, before  # the SFT model breaks a good share of its records
    assert after >= 0.9 and after >= before + 0.1, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_reward"] for r in rows if "eval_reward" in r][-1] >= 0.9  # the run's own evaluation agrees
    assert (tmp_path / "grpo" / "loss.png").is_file() and list((tmp_path / "grpo" / "samples").iterdir())
