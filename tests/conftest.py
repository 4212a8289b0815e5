"""Test-session settings, shared fixtures and the slow tier; the tiny-model builders live in tiny_models.py."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from tiny_models import VOCAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (pyproject's addopts run one worker per core), each worker and the processes its tests
    start use their share of the cores: a worker's torch would otherwise start a thread per core, and two
    workers' thread pools spinning on the same cores slow both."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # child processes (CLI runs, torchrun's ranks)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()

TESTS = Path(__file__).resolve().parent
EVERY_TEST = "*"
# The slow tier, in one place: `python -m pytest -m "not slow"` is the quick loop (about 3 minutes on 2 CPU cores),
# `python -m pytest` (CI) runs everything. A file maps to the test functions that are slow (each with all its
# parameters), or to EVERY_TEST. What is here: several processes (torchrun), CPU torch.compile, llama.cpp runs,
# killed or signalled child processes, the quickstart's real model, and tests over ~3 s (pytest --durations).
SLOW = {
    "train/test_distributed.py": {  # torchrun: 2 processes per test (the others check the launch logic in-process)
        "test_two_processes_train_like_one_with_double_accumulation", "test_fsdp_shards_the_base_and_trains_like_one_process",
        "test_several_tasks_train_on_two_processes_like_on_one",
        "test_loading_into_shards_keeps_half_of_each_layer_and_the_rest_whole",
        "test_a_two_process_checkpoint_resumes_on_one_process", "test_a_failing_rank_stops_every_rank_with_its_error_shown",
        "test_preference_objectives_train_on_two_processes_like_on_one", "test_grpo_on_two_processes_trains_like_one",
        "test_grpo_under_fsdp_is_refused_with_what_to_set"},
    "train/test_grpo.py": {"test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result"},  # kill -9 of a child
    "train/test_preference.py": {  # several short training runs each
        "test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run",
        "test_starting_from_an_sft_adapter_keeps_it_as_the_frozen_reference",
        "test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result"},  # kill -9 of a child
    "plan/test_plan.py": {  # train in fresh child processes to measure their peak memory
        "test_the_runtime_item_is_the_measured_runtime", "test_predicted_peak_is_within_15_percent_of_the_measured",
        "test_a_dpo_run_is_planned_as_well_as_sft_on_the_same_rows"},
    "export/test_export_gguf.py": {  # llama.cpp, in a child process each
        "test_llama_cpp_runs_the_gguf_like_lorakit", "test_lora_gguf_on_the_base_gguf_runs_like_the_unmerged_adapter",
        "test_llama_cpp_splits_text_like_each_supported_pre_tokenizer", "test_mistral_exports_as_llama_and_runs_in_llama_cpp",
        "test_gguf_from_a_4_bit_base_holds_the_dequantized_merge", "test_llama_cpp_tokenizes_like_a_sentencepiece_tokenizer",
        "test_k_quants_come_from_llama_cpps_quantizer_and_cost_what_their_bits_say",
        "test_each_architecture_exports_merged_and_as_a_gguf_lora_and_runs_in_llama_cpp"},
    "test_gguf_base.py": {"test_llama_cpp_runs_the_users_own_file_with_the_adapter_like_lorakit"},  # llama.cpp
    "eval/test_verify.py": {"test_each_format_against_lorakit",  # llama.cpp runs
                            "test_on_a_gguf_base_the_adapter_runs_on_the_users_own_file"},
    "train/test_speed.py": {  # torch.compile on CPU
        "test_compiled_loss_softmax_equals_the_eager_one",
        "test_compiled_layers_and_loss_give_the_plain_loss_and_grads_and_undo_restores_them",
        "test_a_second_compiled_run_takes_its_graphs_from_the_cache"},
    "train/test_ckpt_faults.py": {"test_a_hard_kill_at_any_save_stage_never_exposes_a_partial_checkpoint"},  # kill -9
    "train/test_loop_resume.py": {"test_killed_run_resumes_exactly"},  # kill -9
    "train/test_forgetting.py": {"test_two_processes_report_the_forgetting_numbers_of_one"},  # torchrun
    "train/test_ckpt_layout.py": {"test_a_second_run_on_a_locked_directory_is_refused_with_the_holders_pid"},  # a child
    "cli/test_cli_train_safety.py": {"test_sigterm_saves_a_checkpoint_like_ctrl_c",  # SIGTERM to a child training
                                     "test_training_again_into_a_run_is_refused_until_resumed_or_overwritten"},
    "train/test_output_dir.py": {"test_an_accepted_change_resumes_and_is_logged"},
    "serve/test_serve_load.py": {"test_32_requests_from_8_threads_match_their_alone_output"},
    "ui/test_ui_browser.py": EVERY_TEST,  # chromium, training and export processes started from the page
    "ui/test_ui_cli.py": EVERY_TEST,  # `lorakit ui` and the runs it starts, as child processes
    "cli/test_cli_commands.py": {
        "test_python_dash_m_lorakit_runs",  # a child interpreter
        "test_quickstart_runs_every_stage_offline",  # the quickstart's real model: every stage, generation included
        "test_qlora_train_eval_and_merge_through_the_cli", "test_train_then_eval_through_the_cli",
        "test_train_with_packing_and_gradient_checkpointing"},
    "test_quickstart_assets.py": EVERY_TEST,  # the quickstart's real model
    "test_preference_task.py": {"test_dpo_on_the_quickstart_model_learns_the_held_out_preference"},  # SFT + DPO, real model
    "test_grpo_task.py": {"test_grpo_on_the_quickstart_model_raises_the_held_out_reward"},  # SFT + GRPO, real model
    "test_eval_task.py": {"test_a_sweep_and_lorakit_eval_find_the_adapter_that_writes_the_records"},  # sweep + eval, real model
    "test_gguf_task.py": {"test_an_adapter_trained_on_a_real_q4_1_gguf_runs_in_llama_cpp_on_that_file"},  # SmolLM2 GGUF
    "data/test_data_budget.py": {"test_a_10_mb_reply_at_max_seq_len_128_takes_little_memory"},  # a child's peak RSS
    "train/test_loop_train.py": {"test_loss_falls_on_a_learnable_task",
                                 "test_each_step_trains_on_a_random_sample_not_a_length_group"},
    "train/test_loop_accum.py": {"test_two_by_two_equals_four_by_one_on_equal_lengths"},
    "train/test_loop_nan.py": {"test_three_consecutive_skips_stop"},
    "train/test_chunked_loss.py": {"test_a_batch_with_no_supervised_token_gives_zero_that_backpropagates"},
    "test_mixed_batch.py": {"test_generate_with_adapter_names_matches_per_row_greedy_generate"},
    "eval/test_harness.py": {"test_an_unknown_task_names_close_matches_and_the_include_option"},  # ~15k task YAMLs
}


def pytest_configure(config):
    """A renamed or deleted test would leave its SLOW entry silently matching nothing: refuse to start instead."""
    stale = []
    for file, names in SLOW.items():
        path = TESTS / file
        if not path.is_file():
            stale.append(file)
            continue
        if names != EVERY_TEST:
            defined = {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
                       if isinstance(node, ast.FunctionDef)}
            stale += [f"{file}::{name}" for name in sorted(names - defined)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(stale)}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW.get(item.path.relative_to(TESTS).as_posix()) if item.path.is_relative_to(TESTS) else None
        if names == EVERY_TEST or (names and getattr(item, "originalname", item.name) in names):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(123))
