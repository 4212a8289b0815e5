"""`lorakit eval --metrics ... --compare ...`: generated answers scored against references, models side by side.

The oracles: transformers' own greedy generate (PEFT loading the adapter) for the answers, the metric definitions
worked by hand for the scores, and a merged model that must answer as its adapter does."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_helpers import save_chat_llama, save_random_adapter
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.eval.answers import reference_of
from lorakit.eval.metrics import parse_metrics, scorers

MAX_NEW = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return save_random_adapter(model_dir, tmp_path_factory.mktemp("run") / "adapter",
                               targets=("q_proj", "v_proj", "o_proj"), scale=0.5)


PROMPTS = ["What is 2 plus 3?", "Name a colour.", "Say hello.", "Count to three.", "What is 7 plus 1?"]


def _oracle_answers(model_dir, adapter_dir=None) -> list[str]:
    """Greedy answers from transformers' generate, the adapter loaded by PEFT."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        new = generated[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        if eos in new:
            new = new[:new.index(eos)]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def _write(path, references):
    with open(path, "w") as f:
        for prompt, reference in zip(PROMPTS, references):
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": reference}]}) + "\n")
    return path


def _json_out(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compare_answers_equal_transformers_greedy_and_are_scored(model_dir, adapter_dir, tmp_path, capsys):
    """References are the base's own greedy answers: the base scores exact 1.0; the adapter answers differently
    (its answers are PEFT's), so it scores lower; every per-example score is the metric of the printed answer."""
    base_answers = _oracle_answers(model_dir)
    adapter_answers = _oracle_answers(model_dir, adapter_dir)
    assert base_answers != adapter_answers  # the adapter changes the answers: a test that can tell them apart
    data = _write(tmp_path / "val.jsonl", base_answers)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact,contains",
                 "--metrics", "rouge_l", "--compare", "base", str(adapter_dir), "--max-new-tokens", str(MAX_NEW),
                 "--dtype", "float32", "--json"]) == 0
    out = _json_out(capsys)
    base, adapter = out["models"]
    assert (base["name"], adapter["name"]) == ("base", "adapter")
    assert [a["answers"]["base"] for a in out["answers"]] == base_answers
    assert [a["answers"]["adapter"] for a in out["answers"]] == adapter_answers
    assert base["scores"]["exact"] == 1.0
    expected = sum(a.strip() == b.strip() for a, b in zip(adapter_answers, base_answers)) / len(PROMPTS)
    assert adapter["scores"]["exact"] == pytest.approx(expected) and expected < 1.0
    assert base["loss"] is not None and adapter["loss"] is not None and base["loss"] != adapter["loss"]


def test_the_loss_column_is_each_models_own_loss(model_dir, adapter_dir, tmp_path, capsys):
    data = _write(tmp_path / "val.jsonl", ["It is 5.", "Red.", "Hello!", "One, two, three.", "It is 8."])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--compare", "--adapter", str(adapter_dir),
                 "--max-new-tokens", "2", "--dtype", "float32", "--json"]) == 0
    compared = {m["name"]: m["loss"] for m in _json_out(capsys)["models"]}
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--dtype", "float32", "--json"]) == 0
    base_alone = _json_out(capsys)["loss"]
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--data", str(data),
                 "--dtype", "float32", "--json"]) == 0
    adapter_alone = _json_out(capsys)["loss"]
    assert compared["base"] == pytest.approx(base_alone, rel=1e-5)
    assert compared["adapter"] == pytest.approx(adapter_alone, rel=1e-5)


def test_a_merged_model_answers_as_its_adapter(model_dir, adapter_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(merged),
                 "--dtype", "float32"]) == 0
    data = _write(tmp_path / "val.jsonl", ["x"] * len(PROMPTS))
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact", "--compare",
                 str(adapter_dir), str(merged), "--max-new-tokens", str(MAX_NEW), "--dtype", "float32", "--json"]) == 0
    out = _json_out(capsys)
    assert [m["name"] for m in out["models"]] == ["adapter", "merged"]
    assert all(a["answers"]["adapter"] == a["answers"]["merged"] for a in out["answers"])
    assert out["models"][0]["loss"] == pytest.approx(out["models"][1]["loss"], rel=1e-4)


def test_seeded_sampling_repeats_and_does_not_depend_on_the_other_models(model_dir, adapter_dir, tmp_path, capsys):
    data = _write(tmp_path / "val.jsonl", ["x"] * len(PROMPTS))
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", str(MAX_NEW),
              "--temperature", "1.0", "--dtype", "float32", "--json", "--metrics", "exact"]
    assert main(common + ["--seed", "3", "--compare", "base", str(adapter_dir)]) == 0
    together = [a["answers"]["base"] for a in _json_out(capsys)["answers"]]
    assert main(common + ["--seed", "3"]) == 0
    alone = [a["answers"]["base"] for a in _json_out(capsys)["answers"]]
    assert together == alone
    assert main(common + ["--seed", "4"]) == 0
    other_seed = [a["answers"]["base"] for a in _json_out(capsys)["answers"]]
    assert other_seed != alone  # the seed matters: sampling is really on


def test_table_and_differences_are_printed(model_dir, adapter_dir, tmp_path, capsys):
    data = _write(tmp_path / "val.jsonl", _oracle_answers(model_dir))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact", "--compare", "base",
                 str(adapter_dir), "--max-new-tokens", str(MAX_NEW), "--dtype", "float32", "--show", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == ["model", "exact", "loss", "ppl"]
    assert lines[header + 2].split()[:2] == ["base", "1.000"]
    assert "prompts answered differently; the first 1:" in out


def test_html_report_is_self_contained_with_answers_and_loss_curves(model_dir, adapter_dir, tmp_path, capsys):
    run = adapter_dir.parent
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7})))
    data = _write(tmp_path / "val.jsonl", ["<b>It is 5.</b>"] + ["x"] * (len(PROMPTS) - 1))
    report = tmp_path / "report.html"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact,rouge_l", "--compare",
                 "base", str(adapter_dir), "--max-new-tokens", str(MAX_NEW), "--dtype", "float32",
                 "--report", str(report)]) == 0
    page = report.read_text()
    assert "&lt;b&gt;It is 5.&lt;/b&gt;" in page and "<b>It is 5.</b>" not in page  # escaped
    assert "<svg" in page and "Training curves" in page  # the run's curves, inline
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page) and "url(http" not in page  # nothing to fetch
    assert "<script src" not in page and "<link" not in page
    for answer in _oracle_answers(model_dir, adapter_dir):
        words = [w for w in answer.split(" ") if w]
        if words:
            assert words[0].replace("&", "&amp;").replace("<", "&lt;") in page


# ---- metrics ------------------------------------------------------------------------------------------------
def test_metrics_follow_their_definitions():
    score = scorers(parse_metrics(["exact,contains,json_valid,json_fields,rouge_l"]) + ["regex"], regex=r"#### (\d+)")
    assert score["exact"]("  42\n", "42").value == 1.0 and score["exact"]("42.", "42").value == 0.0
    assert score["contains"]("the answer is 42.", "42").value == 1.0 and score["contains"]("4 2", "42").value == 0
    assert score["regex"]("so #### 17", "17").value == 1.0 and score["regex"]("so #### 18", "17").value == 0.0
    assert score["json_valid"]('```json\n{"a": 1}\n```', None).value == 1.0
    assert score["json_valid"]("{'a': 1}", None).value == 0.0
    fields = score["json_fields"]('{"name": "Ann", "age": 30, "x": 1}', {"name": "Ann", "age": 31})
    assert fields.value == 0.5 and fields.fields == {"name": 1.0, "age": 0.0}
    assert score["json_fields"]("not json", '{"a": 1}').value == 0.0
    strict = score["json_fields"]('{"on": 1, "n": 2.0, "xs": [true, {"k": 1}]}', {"on": True, "n": 2, "xs": [True, {"k": 1}]})
    assert strict.fields == {"on": 0.0, "n": 1.0, "xs": 1.0}  # true is not 1; 2.0 is 2
    with pytest.raises(ValueError, match="non-empty JSON object"):
        score["json_fields"]("{}", "42")
    # ROUGE-L by hand: LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/5, R = 5/6
    p, r = 1.0, 5 / 6
    assert score["rouge_l"]("the cat on the mat", "the cat sat on the mat").value == pytest.approx(2 * p * r / (p + r))
    found = scorers(["regex"], regex=r"\d+")["regex"]
    assert found("x 12", None).value == 1.0 and found("none", None).value == 0.0


def test_metric_choice_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="unknown metric 'bleu'; choose from exact"):
        parse_metrics(["exact,bleu"])
    with pytest.raises(ConfigError, match="needs a pattern: --regex"):
        parse_metrics(["regex"])
    with pytest.raises(ConfigError, match="not a regular expression"):
        scorers(["regex"], regex="(")


def test_reference_is_found_in_every_format():
    assert reference_of({"prompt": "q", "completion": "a"}) == "a"
    assert reference_of({"prompt": [{"role": "user", "content": "q"}],
                         "completion": [{"role": "assistant", "content": "a"}]}) == "a"
    assert reference_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) == "a"
    assert reference_of({"instruction": "q", "input": "", "output": "a"}) == "a"
    assert reference_of({"prompt": "q", "answer": 7}) == 7
    assert reference_of({"prompt": "q", "gold": "g"}, column="gold") == "g"
    assert reference_of({"prompt": "q"}) is None


def test_a_record_without_reference_is_named(model_dir, tmp_path, capsys):
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n" + json.dumps({"prompt": "r"}) + "\n")
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact"]) == 2
    assert "--max-new-tokens 256 leaves no room for a prompt: the model has 128 positions" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact",
                 "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: no reference answer" in err and "--reference COLUMN" in err
    # json_valid needs no reference: the same file is scored, and the loss column says why it is missing
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "json_valid",
                 "--max-new-tokens", "2", "--json"]) == 0
    out = _json_out(capsys)
    assert out["models"][0]["loss"] is None and "not computed" in out["loss_note"]
    assert not math.isnan(out["models"][0]["scores"]["json_valid"])


def test_compare_errors(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "val.jsonl", ["x"] * len(PROMPTS))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--compare", str(tmp_path)]) == 2
    assert "not an adapter directory (adapter_config.json) nor a model directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--compare"]) == 2
    assert "bare --compare compares the base with --adapter" in capsys.readouterr().err


def test_a_report_never_replaces_what_it_did_not_write(model_dir, adapter_dir, tmp_path, capsys):
    """--report is checked before any model loads: a directory, an input file or a file that is not an earlier
    report is refused and left as it was; an earlier report is replaced."""
    data = _write(tmp_path / "val.jsonl", ["x"] * len(PROMPTS))
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--metrics", "exact", "--max-new-tokens", "2",
              "--dtype", "float32", "--report"]
    for target, message in ((tmp_path, "is a directory"), (data, "is one of this command's inputs"),
                            (mine, "exists and is not a lorakit eval report")):
        assert main(common + [str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Loading weights" not in err
    assert mine.read_text() == "<html>my notes</html>" and data.read_text().count("\n") == len(PROMPTS)
    report = tmp_path / "out" / "report.html"
    for _ in range(2):  # the second run replaces the first's report
        assert main(common + [str(report)]) == 0
    page = report.read_text()
    assert page.count("<tr class=differ>") == len(PROMPTS)  # one model: every answer shown, none hidden


def test_regex_alone_scores_only_the_pattern(model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))  # no references at all
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--regex", ".", "--max-new-tokens", "3",
                 "--dtype", "float32", "--json"]) == 0
    out = _json_out(capsys)
    assert out["metrics"] == ["regex"]
    answers = [a["answers"]["base"] for a in out["answers"]]
    assert out["models"][0]["scores"]["regex"] == pytest.approx(sum(bool(a) for a in answers) / len(answers))
