"""DPO on the quickstart model learns the shipped preference data (examples/preference/, made by
scripts/make_preference_assets.py): a shortened scripts/check_preference_task.py. Slow: it trains the real
quickstart model, SFT then DPO (the full check runs 1000 + 150 steps and also compares greedy answers)."""

import sys

import torch

from script_helpers import load_script


def test_dpo_on_the_quickstart_model_learns_the_held_out_preference(tmp_path):
    """200 SFT steps teach the format and digit copying (not number words); DPO on the pairs then prefers the
    correct record on more than 90% of the held-out pairs, from a chance-level start."""
    check = load_script("check_preference_task")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = check.run_check(tmp_path, sft_steps=200, steps=60, generate=0, show=0, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("check_preference_task", None)
    assert 0.3 < result.base_prefers_chosen < 0.7 and 0.3 < result.sft_prefers_chosen < 0.7  # about chance
    assert result.accuracy_before == 0.0
    assert result.accuracy_after > 0.9, result
    assert result.accuracy_after > max(result.base_prefers_chosen, result.sft_prefers_chosen)
    assert abs(result.run_accuracies[-1][1] - result.accuracy_after) <= 0.02  # the run's own eval metric agrees
