"""Several adapters trained in one run (`tasks:`): each adapter, its per-step losses and its evaluation equal what
training it alone on the same rows gives; the run resumes exactly; configs that cannot work are refused."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from data_helpers import save_chat_llama
from lorakit.cli.main import main
from lorakit.config import load_run_config
from lorakit.errors import ConfigError

STEPS = 9  # task a has 5 batches per epoch and task b 7: both start a second epoch within the run
TARGETS = "[q_proj, k_proj, v_proj, o_proj]"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    save_chat_llama(root / "model")
    for name, n, seed in (("a", 10, 0), ("b", 14, 1), ("b_val", 4, 2)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                x, y = (seed * 7 + i * 3) % 10, (i * 5 + 1) % 10
                question = (f"What is {x} plus {y}?" if name == "a" else f"Say {x} then {y}.") + " Now." * (i % 3)
                answer = f"It is {x + y}." if name == "a" else f"{x} {y}"
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return root


def _write(root, name: str, body: str) -> str:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        lora: {{r: 4, lora_alpha: 8, target_modules: {TARGETS}}}
        train: {{max_steps: {STEPS}, batch_size: 2, lr: 5.0e-3, lr_schedule: cosine, seed: 0, max_grad_norm: 0.05,
                save_every: 4}}
        output_dir: {root / name}
        """) + textwrap.dedent(body))
    return str(path)


def _joint(root, name: str = "joint") -> str:
    return _write(root, name, f"""\
        data: {{max_seq_len: 64}}
        tasks:
          - {{name: a, train: {root / "a.jsonl"}}}
          - {{name: b, train: {root / "b.jsonl"}, validation: {root / "b_val.jsonl"},
             lora: {{r: 8, lora_alpha: 8, target_modules: [q_proj, v_proj]}}}}
        """)


def _alone(root, task: str) -> str:
    if task == "a":
        return _write(root, "alone_a", f"data: {{train: {root / 'a.jsonl'}, max_seq_len: 64}}\n")
    return _write(root, "alone_b", f"""\
        data: {{train: {root / "b.jsonl"}, validation: {root / "b_val.jsonl"}, max_seq_len: 64}}
        lora: {{r: 8, lora_alpha: 8, target_modules: [q_proj, v_proj]}}
        """)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(workdir):
    for config in (_joint(workdir), _alone(workdir, "a"), _alone(workdir, "b")):
        assert main(["train", config]) == 0
    return workdir


def test_each_adapter_equals_training_it_alone(runs):
    """Same rows, steps and seed: the jointly trained adapters match the ones trained one at a time, though the
    tasks differ in rank, targets and size (both wrap into a second epoch), and clipping is active."""
    for task in ("a", "b"):
        joint = load_file(runs / "joint" / "adapter" / task / "adapter_model.safetensors")
        alone = load_file(runs / f"alone_{task}" / "adapter" / "adapter_model.safetensors")
        assert joint.keys() == alone.keys()
        for key in alone:
            assert torch.allclose(joint[key], alone[key], atol=2e-5, rtol=1e-4), key
        assert any(alone[k].abs().max() > 0 for k in alone if "lora_B" in k)  # B moved away from zero
        config = json.loads((runs / "joint" / "adapter" / task / "adapter_config.json").read_text())
        assert config["r"] == (4 if task == "a" else 8)


def test_per_task_losses_equal_the_losses_alone(runs):
    joint = [r for r in _rows(runs / "joint") if "loss" in r]
    assert len(joint) == STEPS
    for task in ("a", "b"):
        alone = [r["loss"] for r in _rows(runs / f"alone_{task}") if "loss" in r]
        assert [r["task_loss"][task] for r in joint] == pytest.approx(alone, rel=1e-5)
    eval_joint = [r["eval_loss"] for r in _rows(runs / "joint") if "eval_loss" in r]
    eval_alone = [r["eval_loss"] for r in _rows(runs / "alone_b") if "eval_loss" in r]
    assert eval_joint == pytest.approx(eval_alone, rel=1e-5)  # only b has validation data


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(runs):
    """The joint run's step-4 checkpoint, copied to a fresh output directory, resumes to the same adapters."""
    config = _joint(runs, "resumed")
    shutil.copytree(runs / "joint" / "checkpoints" / "step-00000004", runs / "resumed" / "checkpoints" / "step-00000004")
    assert main(["train", config, "--resume", "auto"]) == 0
    assert json.loads((runs / "resumed" / "trainer_state.json").read_text())["resumed_from"] == 4
    for task in ("a", "b"):
        resumed = load_file(runs / "resumed" / "adapter" / task / "adapter_model.safetensors")
        straight = load_file(runs / "joint" / "adapter" / task / "adapter_model.safetensors")
        for key in straight:
            assert torch.equal(resumed[key], straight[key]), key


@pytest.mark.parametrize("body, message", [
    ("data: {train: x.jsonl}\ntasks: [{name: a, train: a.jsonl}]\n", "with tasks, each task names its own train"),
    ("data: {}\ntasks: [{name: a, train: a.jsonl}, {name: a, train: b.jsonl}]\n", "'a' is used twice"),
    ("data: {}\ntasks: [{name: 'no/slash', train: a.jsonl}]\n", "not a valid adapter name"),
    ("data: {}\ntasks: [{name: a, train: a.jsonl, lora: {r: 0}}]\n", "tasks[0].lora.r must be a positive integer"),
    ("data: {}\n", "data.train: required"),
])
def test_task_configs_that_cannot_work_are_refused_by_field(tmp_path, body, message):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\n" + body)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert message in str(caught.value)


def test_modules_to_save_is_refused_in_a_multi_task_run(workdir, capsys):
    """A full copy of lm_head is not a per-row adapter: the run stops before the first step, saying what to change."""
    config = _joint(workdir, "heads")
    text = (workdir / "heads.yaml").read_text()
    (workdir / "heads.yaml").write_text(text.replace("lora: {r: 4, lora_alpha: 8,", "lora: {r: 4, modules_to_save: [lm_head],"))
    capsys.readouterr()
    assert main(["train", config]) == 2
    assert "remove modules_to_save and set bias: none" in capsys.readouterr().err
    assert not (workdir / "heads" / "checkpoints").exists()


def test_one_joint_step_gives_each_adapter_its_alone_gradient():
    """Adam and clipping hide a constant gradient scale, so check the raw gradients of one step: each task's loss is
    divided by its own supervised tokens and reaches only its own adapter, despite padding to the longer task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, wrap
    from lorakit.data.collate import collate
    from lorakit.data.prepare import Example
    from lorakit.train.tasks import joint_batch, supervised_by_task, task_loss_sums

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50))

    def examples(seed, rows, length, supervised):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(rows):
            ids = torch.randint(0, 50, (length,), generator=g).tolist()
            out.append(Example(ids, [-100] * (length - supervised) + ids[-supervised:], "test"))
        return out

    configs = {"a": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               "b": LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)}
    batches = {"a": collate(examples(1, 2, 12, 3), 0), "b": collate(examples(2, 3, 7, 6), 0)}
    alone = {}
    for name, config in configs.items():
        base = tiny()
        torch.manual_seed(1)  # each adapter's init draws from the same seed, as in a run of its own
        model = wrap(base, config, adapter_name=name)
        loss = model(input_ids=batches[name]["input_ids"], attention_mask=batches[name]["attention_mask"],
                     labels=batches[name]["labels"]).loss  # transformers' mean over the supervised tokens
        loss.backward()
        alone[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    base = tiny()
    torch.manual_seed(1)
    model = wrap(base, configs["a"], adapter_name="a")
    torch.manual_seed(1)
    model.add_adapter("b", configs["b"])
    model.set_adapter(["a", "b"])
    batch = joint_batch([("a", batches["a"]), ("b", batches["b"])], 0)
    counts = supervised_by_task([batch], ["a", "b"])
    assert counts == {"a": 6, "b": 18}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    sums = task_loss_sums(model, inputs, batch, ["a", "b"], chunk_tokens=4)
    sum(sums[n] / counts[n] for n in sums).backward()
    joint = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name in ("a", "b"):
        assert alone[name] and all(torch.allclose(joint[n], g, atol=1e-6, rtol=1e-4) for n, g in alone[name].items())


def test_eval_and_data_inspect_take_a_task(runs, capsys):
    """`--task` picks the task's adapter and data; without it a tasks config is an error naming the tasks."""
    config = _joint(runs)
    capsys.readouterr()
    assert main(["eval", config, "--task", "b", "--json", "--dtype", "float32"]) == 0
    joint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    last_eval = [r["eval_loss"] for r in _rows(runs / "alone_b") if "eval_loss" in r][-1]
    assert joint == pytest.approx(last_eval, rel=1e-5)
    assert main(["data", "inspect", config, "--task", "a", "-n", "1", "--color", "never"]) == 0
    assert "[[It is" in capsys.readouterr().out
    for command in (["eval", config], ["data", "inspect", config]):
        assert main(command) == 2
        assert "choose one with --task (a, b)" in capsys.readouterr().err


def test_routed_rows_in_base_dtype_match_each_adapter_alone():
    """With a bf16 base and fp32 adapters (fit's default adapter_compute), a row routed to its adapter gets what
    that adapter alone computes, and the fp32 weights get gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, wrap

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=50)).to(torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = wrap(base, config, adapter_name="a")
    model.add_adapter("b", config)
    model.compute_adapters_in_base_dtype(True)
    model.set_adapter(["a", "b"])  # both train, as in a run with two tasks
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    routed = model(input_ids=ids, adapter_names=["a", "b"]).logits
    routed.float().square().mean().backward()
    for name in ("a", "b"):
        grads = [p.grad for n, p in model.named_parameters() if f".lora_B.{name}" in n]
        assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    for row, name in enumerate(("a", "b")):
        alone = {}
        for adapter in ("a", "b"):
            model.set_adapter(adapter)
            with torch.no_grad():
                alone[adapter] = model(input_ids=ids[row:row + 1]).logits.float()
        assert torch.allclose(routed[row:row + 1].float(), alone[name], atol=2e-2, rtol=2e-2)
        other = "b" if name == "a" else "a"
        assert not torch.allclose(routed[row:row + 1].float(), alone[other], atol=2e-2, rtol=2e-2)
