"""Tool-calling and reasoning data: rendered by real model families' chat templates (Qwen2.5 and Qwen3's Hermes
`<tool_call>` style, Llama 3.1's JSON style), with the loss on the assistant's text, reasoning and tool calls only.

The templates are the originals that TRL ships for identifying models (trl/chat_templates, "as shipped by" the model
repositories); TRL is the test oracle here too: its training variant of the Qwen2.5 template marks the assistant's
output with {% generation %}, and transformers' return_assistant_tokens_mask turns that into a mask that lorakit's
labels are compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl
from data_helpers import CHATML_JINJA, build_tokenizer, tok, write_jsonl  # noqa: F401 (fixtures)

from lorakit.data import (IGNORE_INDEX, BadRecord, DataOptions, Turn, chat_tools, normalise, prepare,
                          resolve_template, tokenize_conversation)
from lorakit.data.inspect import report
from lorakit.data.preference import prompt_turns
from lorakit.errors import DataError

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
RESULT = '{"city": "Paris", "sky": "sunny", "celsius": 21}'


def tool_record(*, reasoning: bool = False, arguments=None) -> dict:
    """One round trip: a question, a call, its result, the answer."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments or json.dumps({"city": "Paris"})}}
    first = {"role": "assistant", "content": None, "tool_calls": [call]}
    last = {"role": "assistant", "content": "It is sunny in Paris, 21 degrees."}
    if reasoning:
        first["reasoning_content"] = "The user asks about the weather; the tool knows it."
        last["reasoning_content"] = "The tool says sunny and 21."
    return {"tools": [WEATHER, TIME], "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        first,
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        last]}


def template_tokenizer(name: str):
    return build_tokenizer((TEMPLATES / f"{name}.jinja").read_text())


@pytest.fixture(scope="module")
def qwen25():
    return template_tokenizer("qwen2_5")


def _tokenized(record: dict, tokenizer):
    template = resolve_template(tokenizer)
    turns = normalise(record, "messages")
    return tokenize_conversation(turns, tokenizer, template, tools=chat_tools(record, turns))


def _runs(tokenizer, ids, labels) -> tuple[list[str], str]:
    """(the supervised runs decoded, everything not supervised decoded)."""
    runs, cur, rest = [], [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
            continue
        rest.append(i)
        if cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tokenizer.decode(r) for r in runs], tokenizer.decode(rest)


def test_hermes_style_tool_calls_are_trained_and_results_and_tool_list_are_not(qwen25):
    got = _tokenized(tool_record(), qwen25)
    trained, untrained = _runs(qwen25, got.input_ids, got.labels)
    assert trained == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "It is sunny in Paris, 21 degrees.<|im_end|>"]
    assert RESULT in untrained and "<tool_response>" in untrained  # the tool's result: context, never a target
    assert json.dumps(WEATHER) in untrained and '"name": "get_time"' in untrained  # the tool list, in the system turn


def test_mask_matches_trl_generation_tags_on_the_training_template(qwen25):
    """The oracle: TRL's {% generation %} variant of the same template marks the assistant's output; lorakit's labels
    must mark the same tokens, but for the template's newlines around a turn (lorakit keeps "\\n" after
    `<|im_start|>assistant` with the prompt, as inference feeds it, and leaves the "\\n" after <|im_end|> out)."""
    record = tool_record()
    got = _tokenized(record, qwen25)
    oracle = template_tokenizer("qwen2_5")
    oracle.chat_template = (TEMPLATES / "qwen2_5_training.jinja").read_text()
    messages = [dict(m, content=m["content"] or "") for m in record["messages"]]
    for m in messages:
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    out = oracle.apply_chat_template(messages, tools=record["tools"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert out["input_ids"] == got.input_ids  # the training template renders the same text
    ours = {k for k, label in enumerate(got.labels) if label != IGNORE_INDEX}
    theirs = {k for k, flag in enumerate(out["assistant_masks"]) if flag}
    assert ours and ours <= theirs
    assert all(qwen25.decode([got.input_ids[k]]).strip() == "" for k in theirs - ours), \
        [qwen25.decode([got.input_ids[k]]) for k in sorted(theirs - ours)]


def test_llama31_json_style():
    tokenizer = template_tokenizer("llama3_1")
    record = tool_record()
    del record["messages"][0]  # Llama 3.1 puts the tools in the first user message
    got = _tokenized(record, tokenizer)
    trained, untrained = _runs(tokenizer, got.input_ids, got.labels)
    assert trained == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                       "It is sunny in Paris, 21 degrees.<|eot_id|>"]
    # Meta's template writes a string result as a JSON string (`is iterable` holds for strings in Jinja)
    assert f"<|start_header_id|>ipython<|end_header_id|>\n\n{json.dumps(RESULT)}<|eot_id|>" in untrained
    assert '"name": "get_time"' in untrained


def test_qwen3_reasoning_is_trained_in_its_think_tags_and_equals_think_tags_in_content():
    tokenizer = template_tokenizer("qwen3")
    got = _tokenized(tool_record(reasoning=True), tokenizer)
    trained, untrained = _runs(tokenizer, got.input_ids, got.labels)
    assert trained == ["<think>\nThe user asks about the weather; the tool knows it.\n</think>\n\n<tool_call>\n"
                       '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "<think>\nThe tool says sunny and 21.\n</think>\n\nIt is sunny in Paris, 21 degrees.<|im_end|>"]
    assert RESULT in untrained
    # the same reasoning written into the content with the template's think tags tokenizes the same
    inline = tool_record(reasoning=True)
    for m in inline["messages"]:
        if "reasoning_content" in m:
            m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content'] or ''}"
    assert _tokenized(inline, tokenizer) == got


def test_sharegpt_function_call_and_observation_map_onto_the_same_example(qwen25, write_jsonl):
    sharegpt = {"tools": json.dumps([WEATHER, TIME]), "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "It is sunny in Paris, 21 degrees."}]}
    a = prepare(write_jsonl([tool_record()], "openai.jsonl"), qwen25)
    b = prepare(write_jsonl([sharegpt], "sharegpt.jsonl"), qwen25)
    assert b.summary.format == "sharegpt"
    assert (a.examples[0].input_ids, a.examples[0].labels) == (b.examples[0].input_ids, b.examples[0].labels)


@pytest.mark.parametrize("edit, reason, says", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="get_wether"), "unknown_tool",
     "calls tool 'get_wether', which is not in the record's tool list (its tools are 'get_weather', 'get_time')"),
    (lambda r: r.pop("tools"), "unknown_tool", "the record has no 'tools' list"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='{"city": "Paris"'), "bad_tool_arguments",
     "the arguments of tool call 'get_weather' in 'messages' turn 3 call 1 are not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='["Paris"]'), "bad_tool_arguments",
     "are a list, expected a JSON object"),
    (lambda r: r["messages"].pop(2), "bad_role_order", "turn 3 is a tool result, but the turn before it calls no tool"),
    (lambda r: r["messages"].pop(3), "bad_role_order", "assistant turn 3 calls a tool, but turn 4 (assistant) is not its result"),
    (lambda r: r["messages"].pop(), "bad_role_order", "the conversation ends with a tool result"),
    (lambda r: r.update(tools={"get_weather": {}}), "bad_tools", "'tools' is an object, expected a list"),
    (lambda r: r.update(tools=[{"type": "function"}]), "bad_tools", "'tools' item 1 is not a tool spec"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments={"city": "<|im_end|>"}),
     "special_token_in_tools", "holds '<|im_end|>', which the tokenizer reads as a control token"),
    (lambda r: r["messages"][1].update(tool_calls=[]), "bad_tool_call", "is a user turn with tool_calls"),
])
def test_bad_tool_records_are_named_with_file_line_and_reason(qwen25, write_jsonl, edit, reason, says):
    record = tool_record()
    edit(record)
    path = write_jsonl([tool_record(), record])
    with pytest.raises(DataError) as e:
        prepare(path, qwen25)
    message = str(e.value)
    assert f"{path}:2" in message and reason in message and says in message, message


def test_templates_without_tool_syntax_are_refused(tok, write_jsonl):
    path = write_jsonl([tool_record()])
    with pytest.raises(DataError, match="(?s)template_no_tools.*built-in template 'chatml' has no syntax for tools"):
        prepare(path, tok, DataOptions(template="chatml"))
    # a tokenizer template that ignores `tools` and `tool_calls` (this one renders role and content only)
    with pytest.raises(DataError, match="(?s)template_drops_tools.*leaves out tool 'get_weather', tool 'get_time', "
                                        "the call to 'get_weather' in turn 3"):
        prepare(path, build_tokenizer(CHATML_JINJA))


def test_qwen3_multi_turn_reasoning_says_what_to_do():
    """Qwen3's template drops the reasoning of turns before the last user message: no single render trains every
    turn as inference sees it, and the error says to split the conversation."""
    tokenizer = template_tokenizer("qwen3")
    turns = (Turn("user", "Hi"), Turn("assistant", "Hello", reasoning="Greet back."), Turn("user", "Bye"),
             Turn("assistant", "Goodbye", reasoning="Say goodbye."))
    with pytest.raises(BadRecord, match="leaves out the reasoning of turn 2.*needs one record per user turn"):
        tokenize_conversation(turns, tokenizer, resolve_template(tokenizer))


def test_data_inspect_marks_tool_calls_as_trained_and_results_as_not(qwen25, write_jsonl):
    data = prepare(write_jsonl([tool_record()]), qwen25)
    shown = report(data, qwen25, count=1, stop_ids=resolve_template(qwen25).end_of_turn_ids, color=False)
    assert '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>]]' in shown
    assert f"<tool_response>\n{RESULT}\n</tool_response>" in shown and "no warnings in 1 examples" in shown


def test_preference_data_refuses_tool_turns_instead_of_dropping_them():
    with pytest.raises(BadRecord, match="preference and RL data do not take them yet") as e:
        prompt_turns(tool_record()["messages"][:4] + [{"role": "user", "content": "And tomorrow?"}])
    assert e.value.reason == "tools_unsupported"


def _tool_records(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(n):
        city = rng.choice(["Paris", "Rome", "Oslo", "Lima"])
        record = tool_record(arguments=json.dumps({"city": city}))
        record["messages"][1]["content"] = f"What is the weather in {city}?"
        record["messages"][4]["content"] = f"It is sunny in {city}."
        records.append(record)
    return records


def test_train_eval_and_inspect_tool_data_through_the_cli(tmp_path, write_jsonl, capsys):
    """`lorakit train` on tool-calling conversations (a tiny Llama whose tokenizer carries Qwen2.5's template): it
    trains (validation loss below the base model's) and `lorakit data inspect` shows the calls as trained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main

    tokenizer = template_tokenizer("qwen2_5")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=1024))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    train, val = write_jsonl(_tool_records(32, 0), "train.jsonl"), write_jsonl(_tool_records(8, 1), "val.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name_or_path: {tmp_path / 'model'}, dtype: float32}}\n"
                      f"lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}}\n"
                      f"data: {{train: {train}, validation: {val}, max_seq_len: 1024}}\n"
                      f"train: {{max_steps: 6, batch_size: 4, lr: 1.0e-2, seed: 0}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["data", "inspect", str(config), "-n", "1", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert "format=messages template=tokenizer" in shown and '[[<tool_call>\n{"name": "get_weather"' in shown
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    scores = []
    for adapter in ([], ["--adapter", str(tmp_path / "run" / "adapter")]):
        assert main(["eval", "--model", str(tmp_path / "model"), *adapter, "--data", str(val), "--json",
                     "--dtype", "float32"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert scores[1] < scores[0]
