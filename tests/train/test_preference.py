"""Preference tuning through the recipe and the CLI: objectives dpo, orpo and kto train, log their reward metrics,
resume exactly, refuse bad settings; completion log-probs without the full logits equal those from them."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.config import run_config_from_dict
from lorakit.data import DataOptions
from lorakit.data.preference import collate_preference, prepare_preference
from lorakit.errors import ConfigError
from lorakit.lora import LoraConfig, LoraModel, load_adapter
from lorakit.recipes import run_recipe
from lorakit.train.logprobs import completion_log_probs
from lorakit.train.metrics import read_metrics
from data_helpers import build_tokenizer, CHATML_JINJA, save_chat_llama
from tiny_models import randomize_lora
from kill_support import assert_same_adapter, killed_and_resumed

PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}, I think."}
         for i in range(16)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_llama(tmp_path_factory.mktemp("chat-llama"))


def _files(tmp_path, kto: bool = False):
    records = PAIRS if not kto else [r for p in PAIRS for r in (
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
        {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    path = tmp_path / ("kto.jsonl" if kto else "pairs.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _config(model_dir, tmp_path, objective="dpo", out="run", **preference):
    return {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "objective": objective,
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(_files(tmp_path, objective == "kto")), "validation_fraction": 0.25},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "save_every": 2},
            "preference": preference, "output_dir": str(tmp_path / out)}


def quiet(_line: str) -> None:
    pass


@pytest.mark.parametrize("objective, preference", [
    ("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "simpo"}),
    ("dpo", {"reference": {"precompute": True}}), ("orpo", {}), ("kto", {}),
], ids=["dpo", "ipo", "simpo", "dpo-precompute", "orpo", "kto"])
def test_objective_trains_and_logs_reward_metrics(model_dir, tmp_path, objective, preference):
    config = run_config_from_dict(_config(model_dir, tmp_path, objective, **preference))
    result = run_recipe(config, log=quiet)
    assert result.step == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(steps) == 4 and len(evals) == 2
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(steps[-1])
    assert ("eval_kl" if objective == "kto" else "eval_rewards/accuracies") in evals[-1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter" / "reference").exists()


def test_dpo_moves_rewards_apart_from_a_zero_start(model_dir, tmp_path):
    """A fresh adapter equals the reference (rewards 0); training raises the chosen side's reward over the rejected."""
    config = _config(model_dir, tmp_path)
    config["train"].update(max_steps=12, lr=5e-3)
    run_recipe(run_config_from_dict(config), log=quiet)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1]["eval_rewards/margins"] > 0 and evals[-1]["eval_loss"] < 0.693


def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(model_dir, tmp_path):
    straight = run_recipe(run_config_from_dict(_config(model_dir, tmp_path, out="straight")), log=quiet)
    step2 = tmp_path / "straight" / "checkpoints" / "step-00000002"
    assert step2.is_dir()
    resumed = run_recipe(run_config_from_dict(_config(model_dir, tmp_path, out="halves")), resume=str(step2),
                         log=quiet)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses[2:]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "halves" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:.*taking over a stale lock left by pid:UserWarning")  # what the killed run left
@pytest.mark.parametrize("objective, preference", [("dpo", {"reference": {"precompute": True}}), ("kto", {})],
                         ids=["dpo-precompute", "kto"])
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(model_dir, tmp_path, objective, preference):
    """kill -9 after step 3 (checkpoint at 2), then `resume: auto`: the same losses and adapter bit for bit as a
    run never stopped. Covers the state a preference run adds: precomputed reference log-probs (computed again
    on resume) and KTO's KL partners."""
    straight, resumed = killed_and_resumed(
        "lorakit.recipes.preference", _config(model_dir, tmp_path, objective, out="straight", **preference),
        _config(model_dir, tmp_path, objective, out="killed", **preference))
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses[2:]
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")


def test_resume_refuses_a_changed_preference_setting(model_dir, tmp_path):
    first = _config(model_dir, tmp_path)
    first["train"]["max_steps"] = 2
    run_recipe(run_config_from_dict(first), log=quiet)
    changed = _config(model_dir, tmp_path, beta=0.5)
    with pytest.raises(Exception, match="preference.beta"):
        run_recipe(run_config_from_dict(changed), resume="auto", log=quiet)


def test_starting_from_an_sft_adapter_keeps_it_as_the_frozen_reference(model_dir, tmp_path):
    sft = _config(model_dir, tmp_path, out="sft")
    sft.update(objective="sft")
    sft["data"] = {"train": str(tmp_path / "sft.jsonl")}
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}) + "\n"
        for p in PAIRS), encoding="utf-8")
    sft["preference"] = {}
    run_recipe(run_config_from_dict(sft), log=quiet)
    config = _config(model_dir, tmp_path, reference={"adapter": str(tmp_path / "sft" / "adapter")})
    lines: list[str] = []
    run_recipe(run_config_from_dict(config), log=lines.append)
    assert any("policy starts from" in line for line in lines)
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)
    # Step 1's policy is the reference itself: the log-ratios, so the rewards, are exactly zero.
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert abs(first["loss"] - 0.6931471805599453) < 1e-6


def test_plan_and_deploy_check_use_the_starting_adapter_not_the_lora_section(model_dir, tmp_path):
    """With reference.adapter the policy is that adapter: the memory plan counts its parameters (and its frozen
    copy) and deploy_targets checks its rank, whatever the lora section says."""
    from lorakit.plan.check import plan_run

    sft = _config(model_dir, tmp_path, out="sft")
    sft.update(objective="sft", preference={})
    sft["lora"] = {"r": 32, "target_modules": ["q_proj", "o_proj"]}  # vLLM's default --max-lora-rank is 16
    sft["data"] = {"train": str(tmp_path / "sft.jsonl")}
    sft["train"] = {**sft["train"], "max_steps": 1, "eval_every": 1, "save_every": 1}
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}) + "\n"
        for p in PAIRS), encoding="utf-8")
    adapter = run_recipe(run_config_from_dict(sft), log=quiet).adapter_dir
    trained = sum(p.numel() for p in load_adapter(_tiny_base(model_dir), adapter, is_trainable=True).parameters()
                  if p.requires_grad)

    config = _config(model_dir, tmp_path, reference={"adapter": str(adapter)})  # lora section: r 4 on q, v
    plan = plan_run(run_config_from_dict(config))
    assert plan.shape.lora_params == trained
    item = next(i for i in plan.memory.items if i.name.startswith("LoRA weights"))
    assert item.bytes == 5 * 4 * trained and "frozen reference" in item.note
    fresh = plan_run(run_config_from_dict(_config(model_dir, tmp_path)))
    assert fresh.shape.lora_params < trained and "4 copies" in next(
        i for i in fresh.memory.items if i.name.startswith("LoRA weights")).note

    config["deploy_targets"] = ["vllm"]
    with pytest.raises(ConfigError, match=r"vllm would refuse the adapter.*32"):
        run_recipe(run_config_from_dict(config), log=quiet)
    assert not (tmp_path / "run" / "adapter").exists()
    run_recipe(run_config_from_dict({**config, "deploy_targets": []}), log=quiet)  # the lora section alone passes


def _tiny_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("objective, preference, field", [
    ("orpo", {"loss_type": "ipo"}, "preference.loss_type"),
    ("dpo", {"loss_type": "simpo", "reference": {"precompute": True}}, "preference.reference.precompute"),
    ("dpo", {"loss_type": "hinge", "label_smoothing": 0.1}, "preference.label_smoothing"),
    ("dpo", {"beta": 0}, "preference.beta"),
    ("dpo", {"label_smoothing": 0.5}, "preference.label_smoothing"),
    ("dpo", {"loss_type": "dpo"}, "preference.loss_type"),
], ids=["orpo-loss-type", "simpo-precompute", "hinge-smoothing", "beta", "smoothing-range", "unknown-loss"])
def test_bad_preference_settings_name_the_field(model_dir, tmp_path, objective, preference, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_config_from_dict(_config(model_dir, tmp_path, objective, **preference))


def test_reference_base_shorthand_and_packing_refused(model_dir, tmp_path):
    config = run_config_from_dict(_config(model_dir, tmp_path, reference="base"))
    assert config.preference.reference.adapter is None and not config.preference.reference.precompute
    packed = _config(model_dir, tmp_path)
    packed["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing"):
        run_config_from_dict(packed)


def test_chunked_completion_log_probs_equal_the_full_logits_with_gradients(model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(CHATML_JINJA)
    data = prepare_preference(PAIRS[:3], tokenizer, DataOptions(template="auto"))
    batch = collate_preference(data, [0, 1, 2])
    results = []
    for chunk in (None, 3):
        torch.manual_seed(0)
        model = LoraModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize_lora(model)
        logps, counts = completion_log_probs(model, batch, chunk)
        logps.pow(2).sum().backward()  # a non-uniform upstream gradient per row
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), counts, grads))
    (full, full_counts, full_grads), (chunked, chunked_counts, chunked_grads) = results
    assert torch.equal(full_counts, chunked_counts) and full_counts.tolist()[:3] == [len(e.chosen_ids) for e in data.examples]
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


def test_data_inspect_shows_chosen_and_rejected_with_their_marks(model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    import yaml
    path.write_text(yaml.safe_dump(_config(model_dir, tmp_path)), encoding="utf-8")
    assert main(["data", "inspect", str(path), "-n", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "-- chosen" in out and "-- rejected" in out
    assert "[[It is 0.<|im_end|>]]" in out and "[[It is 1, I think.<|im_end|>]]" in out
    assert "no warnings in 16 examples" in out
