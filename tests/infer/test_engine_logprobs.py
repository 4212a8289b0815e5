"""The engine reports each sampled token's log-probability, and it is what the training forward computes for the same
tokens: GRPO's importance ratio divides one by the other, so a mismatch would silently bias it. Rollouts come from
the weights being trained: after an optimizer step the next rollout's log-probs are the updated model's."""

from __future__ import annotations

import pytest
import torch

from engine_support import build_lora, build_tok, prompts
from lorakit.infer import Engine, SamplingParams
from lorakit.train.logprobs import token_log_probs_of_completions


def rollout(engine: Engine, prompt_ids: list[list[int]], adapter: str | None, params: list[SamplingParams]):
    """All requests submitted at once (continuous batching); each one's (tokens, logprobs)."""
    handles = [engine.submit(p, adapter, q) for p, q in zip(prompt_ids, params)]
    out = []
    for handle in handles:
        events = list(handle)
        out.append(([t for e in events for t in e.token_ids], [x for e in events for x in e.logprobs]))
    return out


def batch(prompt_ids, completions) -> dict:
    """Prompt + completion rows (right-padded), the completion tokens labelled."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    input_ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def training_logprobs(model, prompt_ids, completions, adapter: str, temperature: float) -> list[list[float]]:
    """The training side's per-token log-probs of the completions (the chunked head path)."""
    with torch.no_grad():
        logps, keep = token_log_probs_of_completions(model, batch(prompt_ids, completions), 4, adapter=adapter,
                                                     temperature=temperature)
    return [row[k].tolist() for row, k in zip(logps, keep)]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.3, 1.0), (0.0, 1.0)], ids=["t0.7-top_p", "t1.3", "greedy"])
def test_engine_logprobs_equal_the_training_forward_fp32(temperature, top_p):
    lora, tok = build_lora(), build_tok()
    p = prompts(6, seed=5)
    params = [SamplingParams(max_tokens=10, temperature=temperature, top_p=top_p, seed=i) for i in range(6)]
    with Engine(lora, tok) as engine:
        sampled = rollout(engine, p, "a", params)
    completions = [tokens for tokens, _ in sampled]
    assert all(len(c) == 10 for c in completions)
    trained = training_logprobs(lora, p, completions, "a", temperature or 1.0)
    assert max_gap([lp for _, lp in sampled], trained) < 1e-5  # measured: 5e-7
    assert all(x <= 0 for _, lp in sampled for x in lp)


def test_engine_logprobs_equal_the_training_forward_within_bf16_rounding():
    lora, tok = build_lora(), build_tok()
    lora = lora.to(torch.bfloat16)
    p = prompts(6, seed=6)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=i) for i in range(6)]
    with Engine(lora, tok) as engine:
        sampled = rollout(engine, p, "b", params)
    trained = training_logprobs(lora, p, [t for t, _ in sampled], "b", 1.0)
    # bf16 keeps 8 bits of mantissa: the KV-cached decode and the one-pass forward round differently
    assert max_gap([lp for _, lp in sampled], trained) < 0.02  # measured: 1e-3


def test_after_an_optimizer_step_the_next_rollout_is_the_updated_models():
    lora, tok = build_lora(), build_tok()
    p = prompts(4, seed=7)
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(4)]
    trainable = [param for name, param in lora.named_parameters() if name.endswith((".lora_A.a", ".lora_B.a"))]
    assert trainable
    with Engine(lora, tok) as engine:
        first = rollout(engine, p, "a", params)
        # one optimizer step on adapter a, on the very model object the engine generates with (no copy, no sync)
        for param in trainable:
            param.requires_grad_(True)
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        loss = -token_log_probs_of_completions(lora, batch(p, [t for t, _ in first]), 4, adapter="a")[0].sum()
        loss.backward()
        optimizer.step()
        second = rollout(engine, p, "a", params)
    fresh = training_logprobs(lora, p, [t for t, _ in second], "a", 1.0)
    after_on_first = training_logprobs(lora, p, [t for t, _ in first], "a", 1.0)
    assert max_gap([lp for _, lp in second], fresh) < 1e-4  # the engine saw the step
    assert max_gap([lp for _, lp in first], after_on_first) > 1e-2  # and the step changed the log-probs


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_model_logprobs_and_top_alternatives_are_the_models_own_log_softmax(temperature):
    """SamplingParams.logprobs = k (OpenAI's logprobs / top_logprobs): each chosen token's log-softmax at temperature
    1, whatever the sampling temperature, and the k most likely tokens, from a plain forward over prompt + completion."""
    lora, tok = build_lora(), build_tok()
    p = prompts(3, seed=7)
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, logprobs=4)
    with Engine(lora, tok) as engine:
        runs = [list(engine.submit(q, "b", params)) for q in p]
    for prompt, events in zip(p, runs):
        tokens = [t for e in events for t in e.token_ids]
        with torch.no_grad():
            logits = lora(input_ids=torch.tensor([prompt + tokens]), adapter_names=["b"]).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # the distribution each token was chosen from
        own = torch.tensor([x for e in events for x in e.model_logprobs])
        torch.testing.assert_close(own, logp[torch.arange(len(tokens)), torch.tensor(tokens)], atol=1e-5, rtol=0)
        top = [alts for e in events for alts in e.top_logprobs]
        values, ids = torch.topk(logp, 4)
        assert [[t for t, _ in alts] for alts in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in alts] for alts in top]), values, atol=1e-5, rtol=0)
    with Engine(lora, tok) as engine:
        without = list(engine.submit(p[0], "b", SamplingParams(max_tokens=2)))
    assert without[0].model_logprobs == [] and without[0].top_logprobs == []  # computed only when asked for
