"""A one-pass hyperparameter sweep (`sweep:`): every member's adapter, losses and evaluation equal training that
configuration alone; the members are ranked in sweep.json and the best copied to best_adapter."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from data_helpers import save_chat_llama
from lorakit.cli.main import main
from lorakit.config import load_run_config
from lorakit.config.sweep import members
from lorakit.errors import ConfigError

STEPS = 6
LRS = (5.0e-3, 1.0e-3)
TARGETS = ("[q_proj, v_proj]", "all-linear")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    save_chat_llama(root / "model")
    for name, n, seed in (("train", 12, 0), ("val", 4, 1)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                x, y = (seed * 7 + i * 3) % 10, (i * 5 + 1) % 10
                f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {x} plus {y}?" + " Now." * (i % 3)},
                                                 {"role": "assistant", "content": f"It is {x + y}."}]}) + "\n")
    return root


def _write(root, name: str, body: str, lora: str = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}") -> str:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        lora: {lora}
        data: {{train: {root / "train.jsonl"}, validation: {root / "val.jsonl"}, max_seq_len: 64}}
        train: {{max_steps: {STEPS}, batch_size: 2, lr: 5.0e-3, lr_schedule: cosine, warmup_steps: 2, seed: 0,
                max_grad_norm: 0.05, eval_every: 3}}
        output_dir: {root / name}
        """) + textwrap.dedent(body))
    return str(path)


SWEEP = f"""\
    sweep:
      lr: [{LRS[0]}, {LRS[1]}]
      target_modules: [{TARGETS[0]}, {TARGETS[1]}]
      r: [6]
    """


@pytest.fixture(scope="module")
def runs(workdir):
    assert main(["train", _write(workdir, "swept", SWEEP)]) == 0
    for i, lr in enumerate(LRS):
        for j, targets in enumerate(TARGETS):
            config = _write(workdir, f"alone_{i}{j}", "", lora=f"{{r: 6, lora_alpha: 8, target_modules: {targets}}}")
            assert main(["train", config, "--set", f"train.lr={lr}"]) == 0
    return workdir


def _member_names(workdir) -> list[str]:
    return [m.name for m in members(load_run_config(_write(workdir, "names", SWEEP)))]


def test_the_grid_expands_into_named_members(workdir):
    config = load_run_config(_write(workdir, "names", SWEEP))
    assert [t.name for t in config.tasks] == ["lr5e-03_targets1", "lr5e-03_targetsall-linear",
                                              "lr1e-03_targets1", "lr1e-03_targetsall-linear"]
    assert [t.lr for t in config.tasks] == [5e-3, 5e-3, 1e-3, 1e-3]
    assert [t.lora.target_modules for t in config.tasks] == [["q_proj", "v_proj"], "all-linear"] * 2
    assert {t.lora.r for t in config.tasks} == {6} and {t.lora.lora_alpha for t in config.tasks} == {8}


def test_each_member_equals_training_its_configuration_alone(runs):
    """Same rows, steps, seed and schedule: each member's adapter, per-step losses and evaluation match the run
    of its configuration alone, though members differ in learning rate and targets and clipping is active."""
    swept_rows = [json.loads(line) for line in (runs / "swept" / "metrics.jsonl").read_text().splitlines()]
    for k, name in enumerate(_member_names(runs)):
        i, j = divmod(k, 2)
        joint = load_file(runs / "swept" / "adapter" / name / "adapter_model.safetensors")
        alone = load_file(runs / f"alone_{i}{j}" / "adapter" / "adapter_model.safetensors")
        assert joint.keys() == alone.keys()
        for key in alone:
            assert torch.allclose(joint[key], alone[key], atol=2e-5, rtol=1e-4), (name, key)
        assert any(alone[key].abs().max() > 0 for key in alone if "lora_B" in key)
        alone_rows = [json.loads(line) for line in (runs / f"alone_{i}{j}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["task_loss"][name] for r in swept_rows if "loss" in r] == \
            pytest.approx([r["loss"] for r in alone_rows if "loss" in r], rel=1e-5)
    # the two learning rates really differ: the members of one target set do not end alike
    a = load_file(runs / "swept" / "adapter" / _member_names(runs)[0] / "adapter_model.safetensors")
    b = load_file(runs / "swept" / "adapter" / _member_names(runs)[2] / "adapter_model.safetensors")
    assert not all(torch.allclose(a[key], b[key]) for key in a)


def test_members_are_ranked_by_their_own_validation_loss_and_the_best_is_copied(runs):
    ranking = json.loads((runs / "swept" / "sweep.json").read_text())
    names = _member_names(runs)
    assert ranking["rank_by"] == "eval_loss" and sorted(m["name"] for m in ranking["members"]) == sorted(names)
    for member in ranking["members"]:
        i, j = divmod(names.index(member["name"]), 2)
        alone = [json.loads(line) for line in (runs / f"alone_{i}{j}" / "metrics.jsonl").read_text().splitlines()]
        final_eval = [r["eval_loss"] for r in alone if "eval_loss" in r][-1]
        assert member["eval_loss"] == pytest.approx(final_eval, rel=1e-4)
        assert member["adapter_bytes"] == (runs / "swept" / "adapter" / member["name"] /
                                           "adapter_model.safetensors").stat().st_size
        assert set(member["deploy"]) == {"vllm", "llama.cpp", "ollama", "peft"}
    losses = [m["eval_loss"] for m in ranking["members"]]
    assert losses == sorted(losses) and [m["rank"] for m in ranking["members"]] == [1, 2, 3, 4]
    best = ranking["members"][0]["name"]
    assert ranking["best"] == best
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (runs / "swept" / "best_adapter" / file).read_bytes() == \
            (runs / "swept" / "adapter" / best / file).read_bytes()


def test_generation_metrics_rank_the_members_as_lorakit_eval_scores_them(runs, capsys):
    """sweep.metrics scores each member's greedy answers on data.validation; the numbers equal `lorakit eval
    --metrics` on that member's saved adapter, and rank_by orders by them (highest first)."""
    # long and fast enough for the better member to learn "It is": its ROUGE-L is then above zero
    config = _write(runs, "swept_metrics", """\
        sweep:
          lr: [3.0e-2, 1.0e-4]
          metrics: [contains, rouge_l]
          rank_by: rouge_l
          max_new_tokens: 6
        """, lora="{r: 4, lora_alpha: 8, target_modules: all-linear}")
    assert main(["train", config, "--set", "train.eval_every=null", "--set", "train.max_steps=40",
                 "--set", "train.max_grad_norm=1.0"]) == 0
    ranking = json.loads((runs / "swept_metrics" / "sweep.json").read_text())
    scores = [m["metrics"]["rouge_l"] for m in ranking["members"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0  # a real ordering, not two zeros
    capsys.readouterr()
    for member in ranking["members"]:
        assert main(["eval", config, "--task", member["name"], "--metrics", "contains,rouge_l", "--max-new-tokens", "6",
                     "--json"]) == 0
        alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"][0]["scores"]
        assert member["metrics"] == pytest.approx(alone)


@pytest.mark.parametrize("body, message", [
    ("sweep: {r: [8]}\n", "sweep: names fewer than two combinations"),
    ("sweep: {lr: [1.0e-3, 2.0e-3], rank_by: exact}\n", "sweep.rank_by: 'exact' is neither eval_loss nor one of"),
    ("sweep: {lr: [1.0e-3, 2.0e-3], metrics: [bleu]}\n", "sweep.metrics: unknown metric 'bleu'"),
    ("sweep: {init_lora_weights: [true, pissa]}\n", "sweep.init_lora_weights: pissa moves part of the base"),
    ("sweep: {r: [4, 0]}\n", "sweep: a member's lora.r must be"),
    ("sweep: {lr: [1.0e-3, -1.0]}\n", "sweep.lr: every learning rate must be a positive number"),
    ("sweep: {lr: [1.0e-3, 2.0e-3]}\nobjective: dpo\n", "sweep: supervised fine-tuning only"),
    ("sweep: {r: [1, 2, 3, 4, 5], lr: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}\n", "sweep: 20 combinations; at most 16"),
    ("sweep: {lr: [1.0e-3, 2.0e-3]}\neval: {general_text: g.jsonl}\n", "eval.general_text: measures one adapter"),
])
def test_sweeps_that_cannot_work_are_refused_by_field(workdir, body, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(_write(workdir, "bad", body))


def test_member_names_tell_close_learning_rates_apart(workdir):
    config = load_run_config(_write(workdir, "close", "sweep: {lr: [1.5e-4, 2.0e-4, 1.0e-3]}\n"))
    assert [t.name for t in config.tasks] == ["lr1.5e-04".replace(".", "p"), "lr2e-04", "lr1e-03"]


def test_a_tasks_own_learning_rate_must_be_positive(workdir):
    path = workdir / "bad_lr.yaml"
    path.write_text(f"""\
model: {{name_or_path: {workdir / "model"}}}
data: {{max_seq_len: 64}}
tasks:
  - {{name: a, train: {workdir / "train.jsonl"}, lr: -1.0e-3}}
""")
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.lr: must be a positive number"):
        load_run_config(path)
