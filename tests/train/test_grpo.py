"""GRPO through the recipe and the CLI: rollouts from the engine on the weights being trained, the loss over a
window of micro-batches, metrics, samples, exact resume, failing rewards reported with their record, bad
settings refused with what to change."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from lorakit.cli import main
from lorakit.config import run_config_from_dict
from lorakit.errors import ConfigError
from lorakit.recipes import run_recipe
from lorakit.train.metrics import read_metrics
from data_helpers import save_chat_llama
from kill_support import assert_same_adapter, killed_and_resumed

PROMPTS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_llama(tmp_path_factory.mktemp("chat-llama"))


def _config(model_dir, tmp_path, out="run", train=None, **rl):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    rl = {"num_generations": 4, "max_completion_len": 8, "temperature": 1.0, "sample_every": 2,
          "rewards": [{"function": "length_penalty", "max_chars": 6}, {"function": "regex_match", "pattern": "[aeiou]",
                                                                      "name": "vowel", "weight": 0.5}], **rl}
    return {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "objective": "grpo",
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(path), "validation_fraction": 0.25, "max_seq_len": 64},
            "train": {"max_steps": 4, "batch_size": 2, "lr": 5e-3, "lr_schedule": "constant", "eval_every": 2,
                      "save_every": 2, **(train or {})},
            "rl": rl, "output_dir": str(tmp_path / out)}


def quiet(_line: str) -> None:
    pass


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_trains_on_its_own_rollouts_and_logs_rewards_and_samples(model_dir, tmp_path, loss_type):
    lines: list[str] = []
    result = run_recipe(run_config_from_dict(_config(model_dir, tmp_path, loss_type=loss_type)), log=lines.append)
    assert result.step == 4
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for row in steps:
        assert {"reward", "reward_std", "rewards/length_penalty", "rewards/vowel", "completion_length",
                "truncated_ratio", "clip_ratio/low", "clip_ratio/high", "rollout_tokens_per_s",
                "train_tokens_per_s", "frac_reward_zero_std"} <= set(row)
        # The engine sampled with the adapter as the last optimizer step left it: its log-probs are the training
        # forward's (fp32), at step 1 and after every update alike.
        assert row["logp_mismatch"] < 1e-4, row
    assert any(r["grad_norm"] > 0 for r in steps)  # advantages were not all zero: the adapter moved
    assert [r["step"] for r in rows if "eval_reward" in r] == [2, 4]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step-2.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and {s["step"] for s in samples} == {2}
    assert {"prompt", "completion", "reward", "advantage", "rewards", "finish_reason", "location"} <= set(samples[0])
    # The step's reward metrics are those of the completions in its samples file (groups of 4 consecutive rows)
    row2 = next(r for r in steps if r["step"] == 2)
    rewards = torch.tensor([s["reward"] for s in samples])
    assert row2["reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    group_stds = rewards.view(-1, 4).std(dim=1)
    assert row2["reward_group_std"] == pytest.approx(float(group_stds.mean()), abs=1e-6)
    assert row2["frac_reward_zero_std"] == pytest.approx(float((group_stds < 1e-6).float().mean()))
    vowel = torch.tensor([s["rewards"]["vowel"] for s in samples], dtype=torch.float64)
    assert row2["rewards/vowel/std"] == pytest.approx(float(vowel.std(unbiased=False)), abs=1e-6)
    advantages = torch.tensor([s["advantage"] for s in samples], dtype=torch.float64)
    assert row2["advantage_std"] == pytest.approx(float(advantages.std(unbiased=False)), abs=1e-6)
    assert row2["advantage_abs_mean"] == pytest.approx(float(advantages.abs().mean()), abs=1e-6)
    assert row2["advantage_mean"] == pytest.approx(0.0, abs=1e-5)  # centred within each group
    assert sorted((tmp_path / "run" / "samples").iterdir()) == [tmp_path / "run" / "samples" / "step-2.jsonl",
                                                                tmp_path / "run" / "samples" / "step-4.jsonl"]
    assert any(line.startswith("objective: grpo") for line in lines)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_from_a_mid_run_checkpoint_draws_the_same_completions(model_dir, tmp_path):
    """Each step's rollout is seeded by (seed, epoch, micro-batch): a resumed run samples what the uninterrupted
    one sampled, so rewards, losses and the adapter are the same bit for bit."""
    straight = run_recipe(run_config_from_dict(_config(model_dir, tmp_path, out="straight")), log=quiet)
    step2 = tmp_path / "straight" / "checkpoints" / "step-00000002"
    resumed = run_recipe(run_config_from_dict(_config(model_dir, tmp_path, out="halves")), resume=str(step2),
                         log=quiet)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses[2:]
    for name in ("step-3.jsonl", "step-4.jsonl"):
        if (tmp_path / "straight" / "samples" / name).exists():
            assert (tmp_path / "straight" / "samples" / name).read_text() == \
                   (tmp_path / "halves" / "samples" / name).read_text()
    assert_same_adapter(tmp_path / "straight", tmp_path / "halves")


def test_num_iterations_trains_each_rollout_that_many_steps_with_the_ratio_moving(model_dir, tmp_path):
    """num_iterations 2, grad_accum 2 over 5 prompt micro-batches: windows [0 1] [2 3] [4], each twice, so an
    epoch is 6 steps; the second step of each reuses the first's completions (no rollout), its old policy is the
    first step's, so the ratio moves off 1 (the loss differs from the first step's on the same completions)."""
    config = _config(model_dir, tmp_path, num_iterations=2, sample_every=1, loss_type="grpo",
                     train={"max_steps": None, "epochs": 1, "grad_accum": 2, "lr": 5e-2})
    result = run_recipe(run_config_from_dict(config), log=quiet)
    assert result.step == 6
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert [r["iteration"] for r in rows] == [1, 2] * 3
    samples = {s: (tmp_path / "run" / "samples" / f"step-{s}.jsonl").read_text().splitlines() for s in range(1, 7)}
    for first in (1, 3, 5):
        completions = [json.loads(line)["completion"] for line in samples[first]]
        assert completions == [json.loads(line)["completion"] for line in samples[first + 1]]
        again, fresh = rows[first], rows[first - 1]
        assert again["rollout_s"] == 0.0 and again["logp_mismatch"] is None and fresh["logp_mismatch"] < 1e-4
        assert again["reward"] == fresh["reward"] and again["loss"] != fresh["loss"]
    # 9 training prompts: 4 per window of 2 micro-batches; the last window is one micro-batch of one prompt
    assert len(samples[1]) == 2 * 2 * 4 and len(samples[5]) == 1 * 4


def test_a_resume_between_two_iterations_trains_on_the_checkpointed_rollout(model_dir, tmp_path):
    """num_iterations 2: the checkpoint of step 3 (the first of window 2's two steps) holds that window's
    rollout and old log-probs, so the resumed step 4 is the uninterrupted run's, bit for bit."""
    def config(out):
        return _config(model_dir, tmp_path, out=out, num_iterations=2,
                       train={"max_steps": 6, "save_every": 1, "keep_checkpoints": 10})
    straight = run_recipe(run_config_from_dict(config("straight")), log=quiet)
    step3 = tmp_path / "straight" / "checkpoints" / "step-00000003"
    assert (step3 / "objective.safetensors").is_file()
    resumed = run_recipe(run_config_from_dict(config("halves")), resume=str(step3), log=quiet)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses[3:]
    assert_same_adapter(tmp_path / "straight", tmp_path / "halves")


def _rollout(rows: int, width: int, group: int, seed: int):
    """A rollout with random completions of uneven lengths (prompts of 4 tokens, no padding among them)."""
    from lorakit.train.rollout import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return RolloutBatch(prompt_ids=torch.randint(8, 300, (rows, 4), generator=g), prompt_mask=torch.ones(rows, 4).long(),
                        completion_ids=torch.randint(8, 300, (rows, width), generator=g) * mask, completion_mask=mask,
                        old_logps=torch.zeros(rows, width), rewards=torch.randn(rows, generator=g),
                        advantages=torch.randn(rows, generator=g), completions=[""] * rows,
                        finish_reasons=["stop"] * rows, per_function={})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_a_window_of_micro_batches_has_the_gradient_of_the_whole_batch_at_once(model_dir, loss_type):
    """The loop backpropagates each micro-batch's term; their sum must be the loss of the window as one batch
    (grpo: mean over all completions; dr_grpo: over completions x max_completion_len; dapo: over all tokens)."""
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig, RLConfig, RewardConfig, TrainConfig
    from lorakit.data.prompts import PromptData, PromptRecord
    from lorakit.lora import LoraConfig, LoraModel
    from lorakit.train.objectives.grpo import GRPO
    from lorakit.train.rewards import RewardSet
    from tiny_models import randomize_lora

    loaded = load_base_model(ModelConfig(name_or_path=str(model_dir), dtype="float32", device="cpu"))
    model = LoraModel(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, scale=0.3)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    rl = RLConfig(num_generations=2, max_completion_len=6, loss_type=loss_type,
                  rewards=[RewardConfig(function="json_valid")])
    prompts = PromptData([PromptRecord([8, 9, 10, 11], "p", {}, "p:1")], None, 0)
    objective = GRPO(model, loaded.tokenizer, prompts, TrainConfig(loss_chunk_tokens=None), rl,
                     RewardSet([("json_valid", lambda **kw: 0.0, 1.0)]), log=quiet)
    try:
        first, second = _rollout(4, 6, 2, seed=1), _rollout(2, 3, 2, seed=2)
        window = [{"rollout": first, "epoch": 0, "batch": 0, "iteration": 0},
                  {"rollout": second, "epoch": 0, "batch": 1, "iteration": 0}]
        normaliser = {"completions": 6, "tokens": int(first.completion_mask.sum() + second.completion_mask.sum())}
        for batch in window:
            objective.loss(model, batch, normaliser).term.backward()
        split = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()

        pad = lambda t: torch.nn.functional.pad(t, (0, 3))  # noqa: E731  (the second's completions to width 6)
        whole = _rollout(6, 6, 2, seed=0)
        whole.prompt_ids = torch.cat([first.prompt_ids, second.prompt_ids])
        whole.completion_ids = torch.cat([first.completion_ids, pad(second.completion_ids)])
        whole.completion_mask = torch.cat([first.completion_mask, pad(second.completion_mask)])
        whole.advantages = torch.cat([first.advantages, second.advantages])
        objective.loss(model, {"rollout": whole, "epoch": 0, "batch": 0, "iteration": 0}, normaliser).term.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(split[n], p.grad, rtol=1e-5, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in split.values())
    finally:
        objective.close()


@pytest.mark.filterwarnings("ignore:.*taking over a stale lock left by pid:UserWarning")  # what the killed run left
@pytest.mark.parametrize("iterations", [1, 3])
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(model_dir, tmp_path, iterations):
    """kill -9 after step 3 (checkpoint at 2), then `resume: auto`: step 3 samples again what it sampled before the
    kill (num_iterations 1), or trains again on the rollout of steps 1-2, which the checkpoint holds (3); losses,
    samples and adapter are those of a run never stopped, bit for bit."""
    straight, resumed = killed_and_resumed(
        "lorakit.recipes.grpo", _config(model_dir, tmp_path, out="straight", num_iterations=iterations),
        _config(model_dir, tmp_path, out="killed", num_iterations=iterations))
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses[2:]
    assert (tmp_path / "straight" / "samples" / "step-4.jsonl").read_text() == \
           (tmp_path / "killed" / "samples" / "step-4.jsonl").read_text()
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")


def test_a_reward_function_that_raises_is_reported_with_its_record_and_the_run_goes_on(model_dir, tmp_path,
                                                                                        monkeypatch):
    (tmp_path / "raising_rewards.py").write_text(textwrap.dedent("""\
        def picky(prompt, completion, record):
            if int(record["answer"]) % 4 == 0:
                raise ValueError("cannot judge an even number plus itself")
            return float(len(completion) % 3)
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(model_dir, tmp_path, rewards=[{"function": "raising_rewards:picky"}],
                     train={"max_steps": 6, "batch_size": 3})
    lines: list[str] = []
    result = run_recipe(run_config_from_dict(config), log=lines.append)
    assert result.step == 6
    failed = [line for line in lines if "reward raising_rewards:picky failed on" in line]
    assert failed and "ValueError: cannot judge an even number plus itself" in failed[0]
    line = int(failed[0].split("prompts.jsonl:")[1].split()[0].rstrip(":"))
    assert int(PROMPTS[line - 1]["answer"]) % 4 == 0  # the record named is one the function failed on
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert sum(r["reward_errors"] for r in rows) >= 4  # a failing prompt's 4 completions, each counted


def test_objective_grpo_runs_from_the_cli(model_dir, tmp_path):
    import yaml
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(_config(model_dir, tmp_path, train={"max_steps": 2})))
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("rl, expected", [
    ({"rewards": []}, "rl.rewards: objective grpo needs at least one reward function"),
    ({"rewards": [{"function": "json_vaild"}]}, "'json_vaild' is not a built-in reward (did you mean 'json_valid'?)"),
    ({"rewards": [{"function": "regex_match"}]}, "rl.rewards[0].pattern: regex_match needs it"),
    ({"rewards": [{"function": "json_valid", "column": "answer"}]}, "json_valid does not take it"),
    ({"rewards": [{"function": "m:f", "pattern": "x"}]}, "options are for built-in rewards"),
    ({"rewards": [{"function": "json_valid"}, {"function": "json_valid"}]}, "two rewards are named 'json_valid'"),
    ({"num_generations": 1}, "rl.num_generations: must be at least 2"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "rl.epsilon_high: 0.1 is below rl.epsilon 0.2"),
    ({"num_iterations": 0}, "rl.num_iterations: must be a positive integer"),
    ({"max_completion_len": 64}, "rl.max_completion_len: 64 leaves no room for the prompt in data.max_seq_len 64"),
    ({"loss_type": "ppo"}, "rl.loss_type: must be one of grpo, dr_grpo, dapo"),
])
def test_bad_rl_settings_are_refused_naming_the_field(model_dir, tmp_path, rl, expected):
    with pytest.raises(ConfigError, match=None) as err:
        run_config_from_dict(_config(model_dir, tmp_path, **rl))
    assert expected in str(err.value)


def test_a_reward_module_that_does_not_import_stops_the_run_before_the_model_loads(model_dir, tmp_path):
    config = run_config_from_dict(_config(model_dir, tmp_path, rewards=[{"function": "no_such_module:f"}]))
    with pytest.raises(ConfigError, match="no module 'no_such_module'"):
        run_recipe(config, log=quiet)
    assert not (tmp_path / "run" / "lorakit_run.json").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's config warns about its own deprecated fields
def test_the_defaults_are_trl_grpo_config_defaults():
    trl = pytest.importorskip("trl")
    from lorakit.config import RLConfig

    ours, theirs = RLConfig(), trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False)
    for mine, name in (("num_generations", "num_generations"), ("temperature", "temperature"), ("top_p", "top_p"),
                       ("loss_type", "loss_type"), ("epsilon", "epsilon"), ("epsilon_high", "epsilon_high"),
                       ("beta", "beta"), ("scale_rewards", "scale_rewards"), ("num_iterations", "num_iterations")):
        assert getattr(ours, mine) == getattr(theirs, name), name


def test_the_commented_grpo_example_loads_and_names_every_rl_field():
    from dataclasses import fields
    from pathlib import Path

    from lorakit.config import RLConfig, load_run_config

    path = Path(__file__).resolve().parents[2] / "examples" / "grpo.yaml"
    config = load_run_config(path)
    assert config.objective == "grpo" and len(config.rl.rewards) == 3
    text = path.read_text()
    for f in fields(RLConfig):
        if f.name != "max_prompt_len":  # null by default: what data.max_seq_len leaves
            assert f"  {f.name}:" in text, f"RLConfig.{f.name} is not in examples/grpo.yaml"
