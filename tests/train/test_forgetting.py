"""The forgetting gate (eval.general_text, eval.max_forgetting): the numbers equal PEFT's with the adapter disabled,
they reach metrics.jsonl at every evaluation, a run over the limit warns or stops, a stop writes the best
checkpoint within the limit as the adapter (and rotation keeps it), and bad eval sections are refused by name."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from data_helpers import save_chat_llama
from lorakit import ConfigError
from lorakit.config import field_reference, run_config_from_dict
from lorakit.data import DataSummary, Example, PreparedData, iter_batches
from lorakit.lora import LoraModel
from lorakit.train import fit, read_metrics
from lorakit.train.forgetting import FIELDS, ForgettingGate, forgetting_sums, measure_forgetting
from lorakit.train.runtime import OneProcess
from test_loop_support import TARGETS, config, lora_model, lora_state, quiet, toy_data
from tiny_models import VOCAB, build_model, randomize_lora

peft = pytest.importorskip("peft")


def countdown(n: int = 6, lengths=(10, 14), seed: int = 5, prompt: int = 2) -> PreparedData:
    """General text unlike the training data (toy_data counts up; this counts down), of uneven lengths (padding)
    with the first `prompt` labels masked: what training on toy_data forgets."""
    rng, examples = random.Random(seed), []
    for i in range(n):
        start = rng.randrange(1, VOCAB)
        ids = [1 + (start - k) % (VOCAB - 1) for k in range(lengths[i % len(lengths)])]
        examples.append(Example(input_ids=ids, labels=[-100] * prompt + ids[prompt:], source=f"countdown:{i}"))
    return PreparedData(examples=examples, summary=DataSummary(source="countdown", records_read=n, kept=n),
                        packing=False, max_seq_len=max(lengths), pad_token_id=0)


def gate(**limits) -> ForgettingGate:
    return ForgettingGate(countdown(), batch_size=4, chunk_tokens=1024, **limits)


# ---- the numbers ----------------------------------------------------------------------------------------
def _peft_oracle(peft_model, data: PreparedData) -> tuple[float, float, float]:
    """(loss with the adapter, loss of the base, mean KL(base || adapter)) from PEFT's full logits, written out."""
    loss = loss_base = kl = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in iter_batches(data, 4):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            adapted = peft_model(**inputs).logits[:, :-1].double()
            with peft_model.disable_adapter():
                base = peft_model(**inputs).logits[:, :-1].double()
            targets = batch["labels"][:, 1:]
            keep = targets != -100
            log_p, log_q = torch.log_softmax(adapted[keep], -1), torch.log_softmax(base[keep], -1)  # (n, vocab)
            t = targets[keep]
            loss -= log_p[torch.arange(len(t)), t].sum().item()
            loss_base -= log_q[torch.arange(len(t)), t].sum().item()
            kl += (log_q.exp() * (log_q - log_p)).sum().item()
            tokens += len(t)
    return loss / tokens, loss_base / tokens, kl / tokens


@pytest.mark.parametrize("chunk_tokens", [5, None], ids=["chunked-5", "full-logits"])
def test_the_three_numbers_equal_peft_with_its_adapter_disabled(tmp_path, chunk_tokens):
    """A random (B != 0) PEFT adapter on q..down_proj and lm_head, loaded into lorakit: general_loss,
    general_loss_base and general_kl equal those computed from PEFT's logits, chunked over the tokens or not."""
    pm = peft.get_peft_model(build_model("llama", 0), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                      target_modules=TARGETS + ["lm_head"]))
    randomize_lora(pm, seed=7, scale=0.1)
    pm.eval().save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)  # lm_head: LoRA only
    model = LoraModel(build_model("llama", 0), None).load_adapter(tmp_path / "adapter")
    model.set_adapter("default")
    data = countdown()

    got = measure_forgetting(model, iter_batches(data, 3), OneProcess(), chunk_tokens=chunk_tokens)
    loss, loss_base, kl = _peft_oracle(pm, data)
    assert got.tokens == sum(len(e.labels) - 2 for e in data.examples)  # the supervised targets, padding excluded
    assert got.loss == pytest.approx(loss, abs=1e-5) and got.loss_base == pytest.approx(loss_base, abs=1e-5)
    assert got.kl == pytest.approx(kl, abs=1e-6)
    assert got.kl > 1e-3 and abs(got.loss_increase) > 1e-3  # the adapter matters: the comparison is not vacuous
    assert got.fields()["general_loss_increase"] == pytest.approx(loss - loss_base, abs=1e-5)


def test_a_zero_b_adapter_forgets_nothing():
    """A fresh adapter (B = 0) is the base: KL 0 and the two losses equal; the same model randomised is not."""
    model = lora_model(randomize=False)
    fresh = gate().measure(model, OneProcess())
    assert fresh.kl == pytest.approx(0.0, abs=1e-7) and fresh.loss == pytest.approx(fresh.loss_base, abs=1e-7)
    randomize_lora(model, seed=3, scale=0.1)
    moved = gate().measure(model, OneProcess())
    assert moved.kl > 1e-4 and moved.loss_base == pytest.approx(fresh.loss_base, abs=1e-6)  # the base is untouched


def test_shares_add_up_to_the_whole_and_the_model_mode_is_restored():
    """Under torchrun each process scores every world-th batch and the sums are added: the shares' sums equal
    the whole's. Scoring runs in eval mode and gives the model back in the mode it had."""
    model = lora_model().train()
    batches = list(iter_batches(countdown(8), 2))
    whole = forgetting_sums(model, batches, chunk_tokens=7)
    shares = [forgetting_sums(model, batches[rank::2], chunk_tokens=7) for rank in (0, 1)]
    assert [a + b for a, b in zip(*shares)] == pytest.approx(whole, rel=1e-9)
    assert model.training and all(m.training for m in model.modules())


def test_limits_compare_each_number_and_nan_counts_as_over():
    g = gate(loss_increase=0.1, kl=0.05)
    within = g.measure(lora_model(randomize=False), OneProcess())
    assert g.exceeded(within) == []
    moved = type(within)(loss=within.loss_base + 0.2, loss_base=within.loss_base, kl=0.01, tokens=10)
    assert g.exceeded(moved) == ["general_loss_increase 0.2000 > 0.1"]
    assert gate(kl=0.05).exceeded(moved) == []  # only the limits given apply
    assert len(g.exceeded(type(within)(math.nan, math.nan, math.nan, 0))) == 2


# ---- in the loop ----------------------------------------------------------------------------------------
def test_every_evaluation_writes_the_numbers_to_metrics_the_log_and_hooks(tmp_path):
    seen, lines = [], []
    fit(lora_model(), toy_data(8), config(max_steps=5, eval_every=2), tmp_path, eval_data=toy_data(4, seed=9),
        log=lines.append, forgetting=gate(), hooks=[lambda event, info: seen.append((event, info))])
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for row in evals:
        assert set(FIELDS) <= set(row) and row["general_tokens"] > 0
        assert row["general_loss_increase"] == pytest.approx(row["general_loss"] - row["general_loss_base"])
    assert len({r["general_loss_base"] for r in evals}) == 1  # the base's weights are frozen
    assert len({r["general_kl"] for r in evals}) == 3  # the adapter's are not
    assert [i["general_kl"] for e, i in seen if e == "eval"] == [r["general_kl"] for r in evals]
    assert sum("eval at step" in line and "general loss" in line and "KL" in line for line in lines) == 3
    assert not any("over_max_forgetting" in r for r in evals)  # no limits: numbers only


def test_general_text_alone_is_scored_at_the_end_and_ranks_by_recency(tmp_path):
    """No validation data and no eval_every: the end's evaluation still scores the general text; with limits and
    no loss to rank by, the best step is the latest evaluation within them."""
    result = fit(lora_model(), toy_data(8), config(max_steps=3), tmp_path, log=quiet, forgetting=gate(kl=10.0))
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "general_kl" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval_loss"] is None
    assert result.best_step == 3 and result.stopped_reason is None


def _kl_by_step(tmp_path, **overrides) -> dict[int, tuple[float, float]]:
    """step -> (eval loss, general KL) of an unlimited run of the settings the gate tests use."""
    _run(tmp_path / "probe", gate(), **overrides)
    return {r["step"]: (r["eval_loss"], r["general_kl"])
            for r in read_metrics(tmp_path / "probe" / "metrics.jsonl") if "general_kl" in r}


def _run(out, forgetting, hooks=(), log=quiet, model=None, **overrides):
    """(model, result) of 6 steps on toy_data, evaluating and saving every step, keeping 1 checkpoint (+ the best).
    The model (default: a new one) starts with B = 0, so the first evaluations are close to the base."""
    model = lora_model(randomize=False) if model is None else model
    cfg = config(**{**dict(max_steps=6, eval_every=1, save_every=1, keep_checkpoints=1, lr=2e-2), **overrides})
    return model, fit(model, toy_data(8), cfg, out, eval_data=toy_data(4, seed=9), log=log, forgetting=forgetting,
                      hooks=hooks)


def _adapter(directory) -> dict[str, torch.Tensor]:
    """The LoRA tensors of an adapter directory, named as the model's parameters (and the checkpoints') are."""
    return lora_state(LoraModel(build_model("llama", 0), None).load_adapter(directory))


def test_warn_logs_each_evaluation_over_the_limit_and_trains_on(tmp_path):
    lines = []
    model, result = _run(tmp_path, gate(kl=1e-9, on_forgetting="warn"), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:") and "eval.max_forgetting" in line]
    assert len(warnings) == 6 and all("general_kl" in w and "going on" in w for w in warnings)
    assert result.step == 6 and result.stopped_reason is None and result.best_step is None  # none within the limit
    assert "6 evaluation(s) over eval.max_forgetting" in result.summary
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["over_max_forgetting"] for r in rows if "general_kl" in r)
    saved = load_file(tmp_path / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters() if n in saved)  # the trained adapter


def test_stop_ends_at_the_first_evaluation_over_the_limit_and_keeps_the_best_within_it(tmp_path):
    """A limit between the probe run's KLs: the run stops at the first evaluation over it; adapter/ holds the
    best evaluation within it (lowest eval loss), whose checkpoint survives rotation (keep_checkpoints 1)."""
    probe = _kl_by_step(tmp_path)
    kls = [probe[s][1] for s in sorted(probe)]
    first_over = next(k for k in range(2, len(kls)) if kls[k] > max(kls[:k]))  # 0-based: step first_over + 1
    limit = (max(kls[:first_over]) + kls[first_over]) / 2
    within = {s: probe[s][0] for s in sorted(probe) if s <= first_over}
    best = min(within, key=within.get)

    snapshots, lines, model = {}, [], lora_model(randomize=False)

    def snapshot(event, info):  # the adapter as each evaluation saw it
        if event == "eval":
            snapshots[info["step"]] = lora_state(model)

    out = tmp_path / "run"
    _, result = _run(out, gate(kl=limit), hooks=[snapshot], log=lines.append, model=model)

    assert result.step == first_over + 1 and result.stopped_reason == "forgetting" and result.best_step == best
    assert any(line.startswith(f"warning: step {first_over + 1}: forgetting over") and "stopping" in line
               for line in lines)
    rows = read_metrics(out / "metrics.jsonl")
    assert max(r["step"] for r in rows) == first_over + 1 and rows[-1]["stopped_reason"] == "forgetting"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["stopped_reason"] == "forgetting" and state["adapter_step"] == best == state["best_step"]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best:08d}", f"step-{first_over + 1:08d}"})  # rotation spared the best

    adapter = _adapter(out / "adapter")
    checkpoint = load_file(out / "checkpoints" / f"step-{best:08d}" / "model.safetensors")
    assert adapter.keys() == snapshots[best].keys() == checkpoint.keys()
    assert all(torch.equal(adapter[n], snapshots[best][n]) and torch.equal(adapter[n], checkpoint[n]) for n in adapter)
    trained = lora_state(model)  # the model keeps what trained (the stop step's weights), not the best's
    assert all(torch.equal(trained[n], snapshots[first_over + 1][n]) for n in trained)
    assert any(not torch.equal(adapter[n], trained[n]) for n in adapter)
    assert f"adapter/ holds the adapter of step {best} (the best within the limits)" in result.summary


def test_stop_with_no_evaluation_within_the_limit_keeps_the_trained_adapter_and_says_so(tmp_path):
    lines = []
    model, result = _run(tmp_path, gate(loss_increase=1e-9, kl=1e-9), log=lines.append, eval_every=2)
    assert result.step == 2 and result.stopped_reason == "forgetting" and result.best_step is None
    assert any("no evaluation stayed within eval.max_forgetting" in line for line in lines)
    assert "adapter/ holds the adapter as trained: no evaluation stayed within the limits" in result.summary
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["adapter_step"] == 2 and state["best_step"] is None
    written = _adapter(tmp_path / "adapter")
    assert all(torch.equal(written[n], p) for n, p in lora_state(model).items())


# ---- the run config -------------------------------------------------------------------------------------
BASE = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
BAD_EVAL = {
    # name: (eval section or whole-config changes, message)
    "limits_without_text": ({"max_forgetting": {"kl": 0.1}}, "eval.max_forgetting: forgetting is measured on "
                                                             "eval.general_text; set general_text"),
    "no_limit_named": ({"general_text": "g.jsonl", "max_forgetting": {}}, "eval.max_forgetting: names no limit; "
                                                                          "give loss_increase, kl or both"),
    "zero_kl": ({"general_text": "g.jsonl", "max_forgetting": {"kl": 0}},
                "eval.max_forgetting.kl: must be a positive number (nats per token), or null for no limit, got 0.0"),
    "negative_increase": ({"general_text": "g.jsonl", "max_forgetting": {"loss_increase": -0.1}},
                          "eval.max_forgetting.loss_increase: must be a positive number"),
    "not_a_mapping": ({"general_text": "g.jsonl", "max_forgetting": 0.1},
                      "eval.max_forgetting: expected a mapping (keys: loss_increase, kl) or null, got float 0.1"),
    "unknown_limit": ({"general_text": "g.jsonl", "max_forgetting": {"kll": 0.1}},
                      "eval.max_forgetting.kll: unknown key (did you mean 'kl'?)"),
    "bad_action": ({"general_text": "g.jsonl", "on_forgetting": "halt"}, "eval.on_forgetting: must be one of stop, "
                                                                         "warn; got 'halt'"),
    "typo": ({"general_txt": "g.jsonl"}, "eval.general_txt: unknown key (did you mean 'general_text'?)"),
}


@pytest.mark.parametrize("case", BAD_EVAL)
def test_a_bad_eval_section_is_refused_naming_the_field(case):
    section, message = BAD_EVAL[case]
    with pytest.raises(ConfigError) as caught:
        run_config_from_dict({**BASE, "eval": section})
    assert message in str(caught.value)


def test_general_text_with_tasks_is_refused_beside_the_other_problems():
    """Each task trains its own adapter, so "the adapter" against its base is ambiguous; the message comes with
    the config's other problems of the same stage (here max_forgetting without a limit)."""
    raw = {"model": {"name_or_path": "m"}, "data": {}, "tasks": [{"name": "a", "train": "a.jsonl"}],
           "eval": {"general_text": "g.jsonl", "max_forgetting": {}}}
    with pytest.raises(ConfigError) as caught:
        run_config_from_dict(raw)
    assert "eval.general_text: measures one adapter against its base; with tasks" in str(caught.value)
    assert "eval.max_forgetting: names no limit" in str(caught.value)


def test_a_good_eval_section_loads_and_is_in_the_field_reference():
    cfg = run_config_from_dict({**BASE, "eval": {"general_text": "g.jsonl", "max_forgetting": {"loss_increase": "1e-1"},
                                                 "on_forgetting": "warn"}})
    assert (cfg.eval.general_text, cfg.eval.max_forgetting.loss_increase, cfg.eval.max_forgetting.kl,
            cfg.eval.on_forgetting) == ("g.jsonl", 0.1, None, "warn")
    assert run_config_from_dict(BASE).eval.general_text is None  # off by default
    reference = field_reference()
    assert "eval:" in reference and "eval.max_forgetting:" in reference
    for name in ("general_text", "max_forgetting", "on_forgetting", "loss_increase", "kl"):
        assert f"  {name}: " in reference


# ---- a run config, end to end ---------------------------------------------------------------------------
def _workdir(root):
    save_chat_llama(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i % 10} plus 2?"},
                                             {"role": "assistant", "content": f"It is {i % 10 + 2}."}]}) + "\n")
    with open(root / "general.jsonl", "w") as f:  # plain text: its format is detected whatever data.format says
        for line in ("hello world, how are you today?", "The quick brown fox jumps over the lazy dog.",
                     "I am fine, thanks for asking."):
            f.write(json.dumps({"text": line}) + "\n")
    return root


def _yaml(root, name: str, eval_section: str, steps: int = 4) -> str:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}}
        data: {{train: {root / "train.jsonl"}, format: messages, max_seq_len: 64}}
        train: {{max_steps: {steps}, batch_size: 2, lr: 5.0e-2, lr_schedule: constant, eval_every: 2, seed: 0,
                memory_check: false}}
        eval: {eval_section}
        output_dir: {root / name}
        """))
    return str(path)


def test_lorakit_train_reads_the_eval_section_and_stops_a_run_over_the_limit(tmp_path):
    """`lorakit train` with eval.general_text (a text file beside chat training data) and a KL limit no adapter
    meets: every number in metrics.jsonl, stopped at the first evaluation, said so, exit 0."""
    from lorakit.cli import main

    root = _workdir(tmp_path)
    config_path = _yaml(root, "run", f"{{general_text: {root / 'general.jsonl'}, max_forgetting: {{kl: 1.0e-9}}}}")
    assert main(["train", config_path]) == 0
    rows = read_metrics(root / "run" / "metrics.jsonl")
    evals = [r for r in rows if "general_kl" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["stopped_reason"] == "forgetting"
    assert set(FIELDS) <= set(evals[0]) and evals[0]["general_kl"] > 1e-9
    assert json.loads((root / "run" / "trainer_state.json").read_text())["stopped_reason"] == "forgetting"
    assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file()



def _objective_config(root, objective: str) -> dict:
    """A 2-step run of `objective` on the chat Llama, evaluating every step, scoring the general text."""
    records = {"dpo": [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
                       for i in range(8)],
               "grpo": [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(8)]}[objective]
    (root / f"{objective}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rl = {"num_generations": 2, "max_completion_len": 4, "rewards": [{"function": "regex_match", "pattern": "[0-9]"}]}
    return {"model": {"name_or_path": str(root / "model"), "dtype": "float32"}, "objective": objective,
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(root / f"{objective}.jsonl"), "validation_fraction": 0.25, "max_seq_len": 64},
            "train": {"max_steps": 2, "batch_size": 2, "lr": 5e-2, "lr_schedule": "constant", "eval_every": 1,
                      "memory_check": False},
            "eval": {"general_text": str(root / "general.jsonl"), "max_forgetting": {"kl": 100.0}},
            **({"rl": rl} if objective == "grpo" else {}), "output_dir": str(root / objective)}


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_preference_and_grpo_runs_report_forgetting_too(tmp_path, objective):
    """The check needs only the model: a dpo run (its eval loss is the preference loss) and a grpo run (no eval
    loss: the best step is the latest evaluation within the limits) score the general text at every evaluation."""
    from lorakit.recipes import run_recipe

    root = _workdir(tmp_path)
    result = run_recipe(run_config_from_dict(_objective_config(root, objective)), log=quiet)
    evals = [r for r in read_metrics(root / objective / "metrics.jsonl") if "general_kl" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(set(FIELDS) <= set(r) for r in evals)
    assert evals[0]["general_loss_base"] == evals[1]["general_loss_base"] and evals[1]["general_kl"] > 0
    assert result.best_step == (2 if objective == "grpo" else min(evals, key=lambda r: r["eval_loss"])["step"])

def test_two_processes_report_the_forgetting_numbers_of_one(tmp_path):
    """torchrun with 2 processes (gloo) scores the general text in shares; the numbers equal one process's with
    twice the gradient accumulation (the same training)."""
    root = _workdir(tmp_path)
    section = f"{{general_text: {root / 'general.jsonl'}}}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as test_distributed.py: the same sums in both runs
    one = subprocess.run([sys.executable, "-m", "lorakit", "train", _yaml(root, "one", section),
                          "--set", "train.grad_accum=2"], capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "lorakit", "train", _yaml(root, "two", section)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    rows = {name: [r for r in read_metrics(root / name / "metrics.jsonl") if "general_kl" in r] for name in ("one", "two")}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [2, 4]
    for a, b in zip(rows["one"], rows["two"]):
        for key in FIELDS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert a["general_tokens"] == b["general_tokens"]

