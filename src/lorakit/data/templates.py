"""Chat templates: a conversation -> token ids + labels, with loss on the assistant turns only.

Two kinds of template, one masking procedure:
- the tokenizer's own Jinja `chat_template` (used whenever the tokenizer has one and `template="auto"`),
- a named built-in (`chatml`, `llama3`, `alpaca`, `plain`) for tokenizers without one.

Both are "render a list of messages to a string". The mask is then built by rendering incrementally: for
assistant turn i, the prompt `render(turns[:i], add_generation_prompt=True)` and the turn end
`render(turns[:i+1])` are tokenized alone and must be token prefixes of the whole conversation. If they
are not, the template does not round-trip, i.e. what inference would feed the model differs from what
it was trained on, and we raise instead of training on a silently shifted mask. Inside the turn, tokens
up to and including the last end-of-turn special token are supervised; anything the template puts after
it (chatml's "\\n") is not. A turn with no end-of-turn token is an error: the model would never learn to
stop (axolotl#3754, the Gemma end-of-turn token masked out while the loss "looked healthy").

Special-token strings typed inside message content (a user writing "<|im_end|>") are tokenized as text:
such content is cut out of the rendered string (via a sentinel render) and encoded with
`split_special_tokens=True`, so users cannot inject control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .formats import Tools, Turn
from .records import BadRecord

IGNORE_INDEX = -100  # labels value meaning "no loss here" (torch.nn.CrossEntropyLoss default ignore_index)
BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca", "plain")
Messages = list[dict[str, Any]]
RenderFn = Callable[[Messages, bool, Tools], str]


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: how to render messages, and which token ids end an assistant turn."""

    name: str
    render: RenderFn
    end_of_turn_ids: frozenset[int]
    literal_strings: tuple[str, ...] = field(default=())  # special-token strings kept literal in content
    tools: bool = False  # renders tool lists, tool calls, tool results and reasoning (the tokenizer's own)


@dataclass(frozen=True)
class Tokenized:
    """One tokenized example. Both lists have the same length; labels use IGNORE_INDEX for "no loss"."""

    input_ids: list[int]
    labels: list[int]
    assistant_ends: tuple[int, ...] = ()  # token index just past each assistant turn's end-of-turn token


def resolve_template(tokenizer: Any, name: str = "auto") -> ChatTemplate:
    """The template to use: the tokenizer's own for `auto` (an error if it has none), else a built-in.

    Raises DataError at startup, not per record, when the tokenizer cannot express the template.
    """
    literals = _special_strings(tokenizer)
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template; set template to one of "
                            f"{', '.join(BUILTIN_TEMPLATES)} (plain for a base model)")

        def render(messages: Messages, add_generation_prompt: bool, tools: Tools = ()) -> str:
            out = tokenizer.apply_chat_template(messages, tools=list(tools) or None, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
            if not isinstance(out, str):
                raise DataError(f"apply_chat_template returned {type(out).__name__}, expected a string")
            return out

        eot = {tid for tid, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        if tokenizer.eos_token_id is not None:
            eot.add(tokenizer.eos_token_id)
        return ChatTemplate("tokenizer", render, frozenset(eot), literals, tools=True)
    if name not in BUILTIN_TEMPLATES:
        raise DataError(f"unknown template {name!r}; expected auto or one of {', '.join(BUILTIN_TEMPLATES)}")
    bos = _bos(tokenizer)
    if name == "chatml":
        _, end = _need_tokens(tokenizer, name, "<|im_start|>", "<|im_end|>")
        return ChatTemplate(name, _chatml, frozenset({end}), literals)
    if name == "llama3":
        ids = _need_tokens(tokenizer, name, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>")
        return ChatTemplate(name, _llama3, frozenset({ids[-1]}), literals)
    eos = tokenizer.eos_token
    if eos is None or tokenizer.eos_token_id is None:
        raise DataError(f"template {name!r} ends each reply with the EOS token, but the tokenizer has no eos_token")
    render = _alpaca_renderer(bos, eos) if name == "alpaca" else _plain_renderer(bos, eos)
    return ChatTemplate(name, render, frozenset({tokenizer.eos_token_id}), literals)


def tokenize_conversation(turns: Sequence[Turn], tokenizer: Any, template: ChatTemplate, *, tools: Tools = (),
                          train_on_prompt: bool = False) -> Tokenized:
    """Token ids and labels for one conversation; labels supervise each assistant turn (its text, reasoning and
    tool calls) and its end-of-turn token, never tool results or the tool list (or everything with
    `train_on_prompt`). Raises BadRecord when the template does not round-trip, or drops tools or reasoning."""
    messages = as_messages(turns)
    check_renders_tools(turns, tools, template)
    ids = _encode_rendered(tokenizer, template, messages, False, tools)
    labels = [IGNORE_INDEX] * len(ids)
    ends = []
    for i, t in enumerate(turns):
        if t.role != "assistant":
            continue
        prompt = _encode_rendered(tokenizer, template, messages[:i], True, tools)
        upto = _encode_rendered(tokenizer, template, messages[:i + 1], False, tools)
        for part, what in ((prompt, "prompt before"), (upto, "conversation up to")):
            if ids[:len(part)] != part:
                at = next((k for k, (a, b) in enumerate(zip(ids, part)) if a != b), min(len(ids), len(part)))
                hint = ("; this template renders a turn differently once later turns follow (Qwen3's drops the "
                        "reasoning of turns before the last user message): give each user turn its own record"
                        if any(turn.reasoning for turn in turns) else "")
                raise BadRecord("template_roundtrip",
                                f"template {template.name!r} does not round-trip: the tokens of the {what} "
                                f"assistant turn {i + 1} rendered alone differ from the full conversation at "
                                f"token {at}, so the loss mask would not match inference{hint}")
        last = max((k for k in range(len(prompt), len(upto)) if ids[k] in template.end_of_turn_ids), default=None)
        if last is None:
            raise BadRecord("no_end_of_turn", f"template {template.name!r} put no end-of-turn token after assistant "
                                              f"turn {i + 1}; the model would never learn to stop")
        labels[len(prompt):last + 1] = ids[len(prompt):last + 1]
        ends.append(last + 1)
    if train_on_prompt:
        labels = list(ids)
    _mask_first(labels)
    return Tokenized(ids, labels, tuple(ends))


def as_messages(turns: Sequence[Turn]) -> Messages:
    """The turns as chat-template messages (OpenAI's shape, as transformers' templates expect). Keys a turn does
    not use are left out, not set empty: Llama 3.1's template tests `'tool_calls' in message`."""
    messages: Messages = []
    for t in turns:
        m: dict[str, Any] = {"role": t.role, "content": t.content}
        if t.tool_calls:
            m["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)},
                                **({"id": c.id} if c.id else {})} for c in t.tool_calls]
        if t.reasoning:
            m["reasoning_content"] = t.reasoning
        if t.name:
            m["name"] = t.name
        if t.tool_call_id:
            m["tool_call_id"] = t.tool_call_id
        messages.append(m)
    return messages


def check_renders_tools(turns: Sequence[Turn], tools: Tools, template: ChatTemplate) -> None:
    """Tool data needs a template with tool syntax, and one that shows what it was given: a template that ignores
    `tools` or `tool_calls` (many do) would train the model on replies to a prompt that never listed the tools,
    or on empty replies instead of calls. Checked by rendering: every tool's and call's name, and the reasoning
    text, must appear in the render."""
    uses = bool(tools) or any(t.uses_tools for t in turns)
    if not uses:
        return
    if not template.tools:
        raise BadRecord("template_no_tools", f"the built-in template {template.name!r} has no syntax for tools, tool "
                                             "calls or reasoning; use the tokenizer's own chat template (template: "
                                             "auto) of a model that was trained on them")
    try:
        rendered = template.render(as_messages(turns), False, tools)
    except Exception as e:  # noqa: BLE001 - a Jinja template may raise anything (raise_exception, TypeError)
        raise BadRecord("template_error", f"template {template.name!r} failed to render: {e}") from None
    missing = [f"tool {spec['function']['name']!r}" for spec in tools if spec["function"]["name"] not in rendered]
    missing += [f"the call to {c.name!r} in turn {n}" for n, t in enumerate(turns, 1) for c in t.tool_calls
                if f'"{c.name}"' not in rendered and c.name not in rendered]
    missing += [f"the result in turn {n}" for n, t in enumerate(turns, 1) if t.role == "tool" and not any(
        shown in rendered for shown in (t.content.strip(), json.dumps(t.content, ensure_ascii=False)))]  # Llama 3.1
    # writes a string result as a JSON string
    missing += [f"the reasoning of turn {n}" for n, t in enumerate(turns, 1) if t.reasoning
                and t.reasoning.strip() not in rendered]
    if missing:
        raise BadRecord("template_drops_tools", f"the tokenizer's chat template leaves out {', '.join(missing[:3])}, so "
                                                "the model would train on text that does not show it: use the chat "
                                                "template of a tool-calling model (a template that keeps reasoning "
                                                "only after the last user message, as Qwen3's, needs one record per "
                                                "user turn)")
    controls = [s for s in template.literal_strings if s in json.dumps([tools, _outside_content(turns)], ensure_ascii=False)]
    if controls:
        raise BadRecord("special_token_in_tools", f"a tool spec, tool call or reasoning text holds {controls[0]!r}, "
                                                  "which the tokenizer reads as a control token there; remove it")


def _outside_content(turns: Sequence[Turn]) -> list[Any]:
    """What of the turns is rendered outside their content: reasoning and tool-call arguments."""
    return [[t.reasoning, [[c.name, dict(c.arguments)] for c in t.tool_calls]] for t in turns]


def tokenize_prompt(prompt: Sequence[Turn], tokenizer: Any, template: ChatTemplate) -> list[int]:
    """The ids a model continues to answer `prompt`: its render with the generation prompt (as tokenize_reply's
    prompt ids); what RL rollouts start from."""
    return _encode_rendered(tokenizer, template, as_messages(prompt), True)


def tokenize_reply(prompt: Sequence[Turn], reply: str, tokenizer: Any, template: ChatTemplate) \
        -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for one assistant reply to the conversation `prompt`, as tokenize_conversation
    would split and supervise it: the prompt is the render with the generation prompt, the reply runs from there
    to its end-of-turn token inclusive (what the template adds after that token belongs to neither). Preference
    data tokenizes each completion of a prompt this way. Raises BadRecord when the template does not round-trip."""
    messages = as_messages(prompt)
    prompt_ids = _encode_rendered(tokenizer, template, messages, True)
    full = _encode_rendered(tokenizer, template, [*messages, {"role": "assistant", "content": reply}], False)
    if full[:len(prompt_ids)] != prompt_ids:
        at = next((k for k, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), len(prompt_ids)))
        raise BadRecord("template_roundtrip",
                        f"template {template.name!r} does not round-trip: the prompt rendered alone differs from the "
                        f"prompt followed by its completion at token {at}, so the completion's mask would not match "
                        "inference")
    last = max((k for k in range(len(prompt_ids), len(full)) if full[k] in template.end_of_turn_ids), default=None)
    if last is None:
        raise BadRecord("no_end_of_turn", f"template {template.name!r} put no end-of-turn token after the "
                                          "completion; the model would never learn to stop")
    return prompt_ids, full[len(prompt_ids):last + 1]


def tokenize_text(text: str, tokenizer: Any) -> Tokenized:
    """Raw text for continued pre-training: [BOS] text EOS, every token supervised; special-token strings
    in the text stay text."""
    if tokenizer.eos_token_id is None:
        raise DataError("text data needs an eos_token to mark where a document ends; the tokenizer has none")
    bos_id = tokenizer.bos_token_id if _bos(tokenizer) else None
    body = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = ([bos_id] if bos_id is not None else []) + list(body) + [tokenizer.eos_token_id]
    labels = list(ids)
    _mask_first(labels)
    return Tokenized(ids, labels, (len(ids),))


def _mask_first(labels: list[int]) -> None:
    """A causal LM never predicts token 0 (the loss shifts labels left by one), so its label is dead
    weight; clearing it keeps supervised-token counts honest and lets packed rows match unpacked loss
    (otherwise the previous example's last token would be trained to predict this one)."""
    if labels:
        labels[0] = IGNORE_INDEX


def _encode_rendered(tokenizer: Any, template: ChatTemplate, messages: Messages, add_generation_prompt: bool,
                     tools: Tools = ()) -> list[int]:
    """Render and tokenize, keeping special-token strings inside message content literal."""
    ids: list[int] = []
    for text, literal in _render_segments(template, messages, add_generation_prompt, tools):
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]
    return ids


def _render_segments(template: ChatTemplate, messages: Messages, add_generation_prompt: bool, tools: Tools = ()) \
        -> list[tuple[str, bool]]:
    """The rendered string cut into (text, is_literal_content) pieces.

    Only content that contains a special-token string is cut out, so ordinary conversations tokenize
    exactly as `apply_chat_template(..., tokenize=True)` would. The cut points come from rendering with
    a sentinel in place of that content; if the template transforms content (e.g. `| trim`) the pieces
    would not reassemble to the real render and we refuse rather than guess.
    """
    try:
        real = template.render(messages, add_generation_prompt, tools)
        protect = [i for i, m in enumerate(messages) if any(s in m["content"] for s in template.literal_strings)]
        if not protect:
            return [(real, False)]
        sentinel = {i: f"\ue000lorakit{i}\ue001" for i in protect}
        masked = [dict(m, content=sentinel[i]) if i in sentinel else m for i, m in enumerate(messages)]
        rendered = template.render(masked, add_generation_prompt, tools)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a Jinja template may raise anything (raise_exception, TypeError)
        raise BadRecord("template_error", f"template {template.name!r} failed to render: {e}") from None
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i in protect:
        at = rendered.find(sentinel[i], pos)
        if at < 0 or rendered.count(sentinel[i]) != 1:
            raise BadRecord("template_error", f"cannot keep special-token text in turn {i + 1} literal: the "
                                              f"template {template.name!r} does not emit message content verbatim")
        pieces += [(rendered[pos:at], False), (messages[i]["content"], True)]
        pos = at + len(sentinel[i])
    pieces.append((rendered[pos:], False))
    if "".join(text for text, _ in pieces) != real:
        raise BadRecord("template_error", f"cannot keep special-token text literal: the template {template.name!r} "
                                          "transforms message content")
    return pieces


def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer would turn into special tokens if they appeared in raw text."""
    found = {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    found.update(t for t in tokenizer.all_special_tokens if t)
    return tuple(sorted(found, key=len, reverse=True))


def _need_tokens(tokenizer: Any, name: str, *markers: str) -> list[int]:
    """Each marker must be one token of the tokenizer; otherwise the template's markup would be plain
    text pieces and no single end-of-turn id would exist."""
    ids, missing = [], []
    for m in markers:
        enc = tokenizer(m, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            missing.append(m)
        else:
            ids.append(enc[0])
    if missing:
        raise DataError(f"template {name!r} needs {', '.join(markers)} as single tokens, but the tokenizer lacks "
                        f"{', '.join(missing)}; add them as special tokens (and resize the model's embeddings) or "
                        f"choose another template ({', '.join(BUILTIN_TEMPLATES)})")
    return ids


def _bos(tokenizer: Any) -> str:
    """The BOS string to prepend, or "" when there is none or it doubles as EOS (GPT-2 style)."""
    bos = tokenizer.bos_token
    return bos if bos and bos != tokenizer.eos_token else ""


def _chatml(messages: Messages, add_generation_prompt: bool, tools: Tools = ()) -> str:
    """<|im_start|>role\\ncontent<|im_end|>\\n per message (Qwen / OpenAI ChatML); no BOS."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama3(messages: Messages, add_generation_prompt: bool, tools: Tools = ()) -> str:
    """Llama 3 headers; content is not trimmed (Meta's template trims) so text is kept byte for byte."""
    out = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _block_renderer(bos: str, eos: str, *, user: str, reply: str, generation_prompt: str) -> RenderFn:
    """Markup-light templates: system text, then each user turn and each reply (ending in EOS) in a block.

    `user` and `reply` are str.format patterns for the turn's content (content is an argument, so braces
    in it are kept as they are).
    """

    def render(messages: Messages, add_generation_prompt: bool, tools: Tools = ()) -> str:
        out = [bos]
        for m in messages:
            if m["role"] == "system":
                out.append(f"{m['content']}\n\n")
            elif m["role"] == "user":
                out.append(user.format(m["content"]))
            else:
                out.append(reply.format(m["content"]) + eos)
        if add_generation_prompt:
            out.append(generation_prompt)
        return "".join(out)

    return render


def _alpaca_renderer(bos: str, eos: str) -> RenderFn:
    """Stanford Alpaca's "### Instruction:/### Response:" blocks, one per exchange, each reply ending in EOS."""
    return _block_renderer(bos, eos, user="### Instruction:\n{}\n\n", reply="### Response:\n{}",
                           generation_prompt="### Response:\n")


def _plain_renderer(bos: str, eos: str) -> RenderFn:
    """For base models: system and user text, a newline, then the reply and EOS; no markup at all."""
    return _block_renderer(bos, eos, user="{}\n", reply="{}", generation_prompt="")
