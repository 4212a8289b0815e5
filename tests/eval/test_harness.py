"""`lorakit eval --harness`: lm-eval's tasks run on the base with the adapter really applied.

A local multiple-choice task (a JSONL and its task YAML, loaded through include_path; nothing downloaded) runs on
a tiny llama, alone and with a saved-and-reloaded LoRA adapter. The oracle: each choice's log-likelihood computed
here straight through the model (the base, then the LoraModel), and the accuracy argmax gives."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.eval import harness
from lorakit.eval.harness import format_table, run_harness
from tiny_models import build_model, randomize_lora

TASK = "lorakit_tiny_colors"
ROWS = [
    {"question": "What color is the sky?", "choices": ["blue", "red", "green"], "label": 0},
    {"question": "What color is grass?", "choices": ["red", "green", "blue"], "label": 1},
    {"question": "What color is a ripe tomato?", "choices": ["green", "blue", "red"], "label": 2},
    {"question": "What color is snow?", "choices": ["white", "black", "red"], "label": 0},
    {"question": "What color is coal?", "choices": ["white", "black", "green"], "label": 1},
    {"question": "What color is the sea?", "choices": ["red", "white", "blue"], "label": 2},
    {"question": "What color is a lemon?", "choices": ["yellow", "blue", "black"], "label": 0},
    {"question": "What color is milk?", "choices": ["black", "white", "yellow"], "label": 1},
]
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The task YAML and its JSONL; the datasets cache of the JSONL goes to a temporary directory too."""
    directory = tmp_path_factory.mktemp("harness-task")
    jsonl = directory / "colors.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    (directory / "colors.yaml").write_text(
        YAML.format(task=TASK, jsonl=jsonl, cache=tmp_path_factory.mktemp("datasets-cache")), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained on the task's own text, within the tiny llama's vocabulary of 96."""
    text = [row["question"] + " " + " ".join(row["choices"]) for row in ROWS]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "</s>"], show_progress=False)
    bpe.train_from_iterator(text * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A LoRA adapter with large random factors (a fresh one has B = 0), saved and loaded back onto a fresh base as
    `lorakit eval --adapter` does."""
    directory = tmp_path_factory.mktemp("adapter")
    lora = lorakit.wrap(build_model("llama"), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_lora(lora, seed=3, scale=0.5)
    lora.save_adapter(directory)
    return lorakit.load_adapter(build_model("llama"), directory)


@pytest.fixture(scope="module")
def base_run(task_dir, tok):
    return run_harness(build_model("llama"), tok, [TASK], include_path=str(task_dir), log=lambda line: None)


@pytest.fixture(scope="module")
def adapter_run(task_dir, tok, adapted):
    return run_harness(adapted, tok, [TASK], include_path=str(task_dir), batch_size=3, log=lambda line: None)


def choice_logliks(model, tok) -> list[list[float]]:
    """Per row, each choice's log-likelihood after the question, as lm-eval defines it: " choice" scored given
    the question, the continuation being the tokens of question + " choice" past those of the question."""
    out = []
    with torch.no_grad():
        for row in ROWS:
            context = tok.encode(row["question"])
            scores = []
            for choice in row["choices"]:
                whole = tok.encode(row["question"] + " " + choice)
                logp = model(input_ids=torch.tensor([whole])).logits.log_softmax(-1)[0]  # (seq, vocab)
                scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
            out.append(scores)
    return out


def accuracy(logliks: list[list[float]]) -> float:
    return sum(max(range(len(s)), key=s.__getitem__) == row["label"] for s, row in zip(logliks, ROWS)) / len(ROWS)


def harness_logliks(result) -> list[list[float]]:
    records = sorted(result.samples[TASK], key=lambda record: record["doc_id"])
    return [[float(resp[0]) for resp in record["filtered_resps"]] for record in records]


def test_the_base_scores_what_its_own_log_likelihoods_give(base_run, tok):
    oracle = choice_logliks(build_model("llama"), tok)
    assert harness_logliks(base_run) == [pytest.approx(row, abs=1e-4) for row in oracle]
    assert base_run.scores[TASK]["acc"].value == accuracy(oracle)
    assert base_run.adapters == [] and base_run.raw["lorakit"]["adapters"] == []


def test_the_adapter_changes_the_score_to_what_the_lora_model_gives(base_run, adapter_run, adapted, tok):
    oracle = choice_logliks(adapted, tok)
    assert harness_logliks(adapter_run) == [pytest.approx(row, abs=1e-4) for row in oracle]
    assert adapter_run.scores[TASK]["acc"].value == accuracy(oracle)
    assert adapter_run.scores[TASK]["acc"].value != base_run.scores[TASK]["acc"].value
    assert adapter_run.adapters == ["default"] and adapter_run.raw["lorakit"]["adapters"] == ["default"]
    assert adapter_run.forwards > 0


def test_the_result_is_plain_floats_json_and_a_table(adapter_run):
    score = adapter_run.scores[TASK]["acc"]
    assert type(score.value) is float and type(score.stderr) is float and score.stderr > 0
    assert adapter_run.raw["results"][TASK]["acc,none"] == score.value
    assert "samples" not in adapter_run.raw
    json.dumps(adapter_run.raw)
    table = format_table(adapter_run)
    assert table.splitlines()[0] == f"lm-eval on adapter(s) default (applied on all {adapter_run.forwards} forwards)"
    assert TASK in table and f"{score.value:.4f}" in table and f"± {score.stderr:.4f}" in table


def test_the_callers_model_and_tokenizer_are_left_as_they_were(adapter_run, adapted, tok):
    """No hook left behind, tie_weights not shadowed, the training flag and the tokenizer's pad token kept."""
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in adapted.modules())
    assert "tie_weights" not in vars(adapted.model)
    assert not adapted.training and not adapted.model.training
    assert tok.pad_token is None


def test_a_run_with_the_adapter_disabled_is_refused(adapted, tok, task_dir):
    with adapted.disable_adapters(), pytest.raises(AdapterError, match=r"not applied .* default skipped in"):
        run_harness(adapted, tok, [TASK], include_path=str(task_dir), limit=2, log=lambda line: None)


def test_a_harness_that_computes_with_another_model_is_refused(adapted, tok, task_dir, monkeypatch):
    """The bug other integrations shipped: the harness reloads the base (by name) and the adapter never runs."""
    build = harness._hflm
    monkeypatch.setattr(harness, "_hflm", lambda HFLM, model, tokenizer, batch_size:
                        build(HFLM, build_model("llama"), tokenizer, batch_size))
    with pytest.raises(AdapterError, match="never ran the model that carries adapter"):
        run_harness(adapted, tok, [TASK], include_path=str(task_dir), limit=2, log=lambda line: None)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_an_adapted_tied_weight_is_evaluated_with_its_adapter_and_left_as_it_was(tok, task_dir, target):
    """HFLM re-ties weights on construction, which would reach into the LoRA wrapper of either tied module (an
    adapted embedding has no .weight; an adapted lm_head would get a stray one)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="tied weights"):
        lora = lorakit.wrap(base, lorakit.LoraConfig(r=4, target_modules=[target, "q_proj"]))
    randomize_lora(lora, scale=0.5)
    before = dict(base.named_parameters(remove_duplicate=False))
    result = run_harness(lora, tok, [TASK], include_path=str(task_dir), limit=2, log=lambda line: None)
    assert result.adapters == ["default"] and result.forwards > 0
    after = dict(base.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[name] is p for name, p in before.items())


def test_an_unknown_task_names_close_matches_and_the_include_option(tok):
    with pytest.raises(ConfigError, match=r"unknown task 'helaswag'; did you mean: hellaswag") as error:
        run_harness(build_model("llama"), tok, ["helaswag"], log=lambda line: None)
    assert "--harness-include DIR" in error.value.hint


def test_a_missing_include_directory_is_refused_by_name(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"--harness-include: .*missing is not a directory"):
        run_harness(build_model("llama"), tok, [TASK], include_path=str(tmp_path / "missing"), log=lambda line: None)


def test_without_lm_eval_the_error_says_how_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(LorakitError, match=r"needs lm-eval .*pip install 'lorakit\[eval\]'") as error:
        run_harness(build_model("llama"), tok, [TASK], log=lambda line: None)
    assert error.value.hint == "pip install 'lorakit[eval]'"


def test_the_cli_runs_the_task_with_and_without_the_adapter(task_dir, tok, base_run, adapter_run, tmp_path, capsys):
    """`lorakit eval --harness` loads the base and the adapter from disk as a user's run does: the same scores
    as run_harness on the models in memory, and the adapter's differ from the base's."""
    from lorakit.cli import main

    model_dir = tmp_path / "base"
    build_model("llama").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    adapter_dir = tmp_path / "adapter"
    lora = lorakit.wrap(build_model("llama"), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_lora(lora, seed=3, scale=0.5)  # the `adapted` fixture's adapter
    lora.save_adapter(adapter_dir)
    common = ["eval", "--model", str(model_dir), "--harness", TASK, "--harness-include", str(task_dir),
              "--dtype", "float32", "--json"]
    scores = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(adapter_dir)])):
        assert main(common + extra) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        scores[name] = out["results"][TASK]["acc,none"]
        assert out["lorakit"]["adapters"] == ([] if name == "base" else ["default"])
    assert scores == {"base": base_run.scores[TASK]["acc"].value, "adapter": adapter_run.scores[TASK]["acc"].value}
    assert main(common[:-1] + ["--adapter", str(adapter_dir)]) == 0
    assert "\nlm-eval on adapter(s) default (applied on all" in capsys.readouterr().out
