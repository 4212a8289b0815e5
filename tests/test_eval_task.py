"""Did the fine-tune work, end to end on the quickstart model: a sweep of two learning rates ranked by a generation
metric, then `lorakit eval --compare` of the base and both members with an HTML report: a shortened
scripts/check_eval_task.py (the full check trains 1000 steps and asks for a larger margin). Slow: it trains the
real quickstart model."""

import json

import torch

from script_helpers import load_script


def test_a_sweep_and_lorakit_eval_find_the_adapter_that_writes_the_records(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check = load_script("check_eval_task")
        run = check.train_sweep(tmp_path, steps=300, log=lambda line: None)
        result = check.compare(run, tmp_path / "report.html")
    finally:
        torch.set_num_threads(threads)
    ranking = json.loads((run / "sweep.json").read_text())
    assert ranking["best"] == "lr3e-03"  # the quickstart's learning rate beats a tenth of it in 300 steps
    assert check.verdict(result, ranking, margin=0.2) == []  # sweep.json's numbers are lorakit eval's too
    scores = {m["name"]: m["scores"] for m in result["models"]}
    assert scores["lr3e-03"]["json_valid"] >= 0.9 > scores["base"]["json_valid"]
    page = (tmp_path / "report.html").read_text()
    assert "lr3e-03" in page and "<mark>" in page and "Training curves" in page
