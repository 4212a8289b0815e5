"""Gradient accumulation: the step's gradient is that of the token-weighted mean loss over the whole window."""

from __future__ import annotations

import torch

from lorakit.train import loop
from test_loop_support import config, lora_model, quiet, toy_data


def _capture_grads(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the gradients each optimizer step applies (a step pre-hook on the loop's optimizer)."""
    seen: list[dict[str, torch.Tensor]] = []
    original = loop.build_optimizer

    def build(params, cfg, *rest):
        opt = original(params, cfg, *rest)
        names = {id(p): n for n, p in params.items()}
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
            {names[id(p)]: p.grad.clone() for g in o.param_groups for p in g["params"]}))
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)
    return seen


def _run(tmp_path, monkeypatch, data, batch_size, grad_accum, steps):
    grads = _capture_grads(monkeypatch)
    model = lora_model()
    result = fit_quiet(model, data, config(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3),
                       tmp_path / f"{batch_size}x{grad_accum}")
    return model, result, grads


def fit_quiet(model, data, cfg, out):
    return loop.fit(model, data, cfg, out, log=quiet)


def test_two_by_two_equals_four_by_one_on_equal_lengths(tmp_path, monkeypatch):
    """Two steps over 4 examples: each window of 2 micro-batches of 2 holds the epoch's 4 examples, like the one
    batch of 4 (the sampler shuffles its batches, so with more examples a window need not be one batch of 4)."""
    data = toy_data(4, lengths=(10,))
    a, ra, ga = _run(tmp_path, monkeypatch, data, 2, 2, 2)
    b, rb, gb = _run(tmp_path, monkeypatch, data, 4, 1, 2)
    for step in range(2):
        for name in ga[step]:
            torch.testing.assert_close(ga[step][name], gb[step][name], atol=1e-6, rtol=1e-5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, p in pa.items():
        assert (p - pb[name]).abs().max() <= 1e-6, name
    assert all(abs(x - y) < 1e-6 for x, y in zip(ra.losses, rb.losses))


def test_unequal_lengths_weigh_by_supervised_tokens(tmp_path, monkeypatch):
    """Lengths 4..14: 2x2 accumulation gives the gradient of sum(token losses) / all supervised tokens of the
    window, equal to one padded batch of 4, and measurably different from a mean of the two micro-batch means."""
    data = toy_data(4, lengths=(14, 4, 11, 5))
    model, result, grads = _run(tmp_path, monkeypatch, data, 2, 2, 1)
    _, result4, grads4 = _run(tmp_path, monkeypatch, data, 4, 1, 1)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads4[0][name], atol=1e-6, rtol=1e-4)

    # the reference: a fresh copy of the model, each example alone, summed token losses / total tokens
    ref = lora_model()
    ref.train()
    total, count, per_example = 0.0, 0, []
    for e in data.examples:
        logits = ref(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1]
        target = torch.tensor(e.labels[1:])
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        per_example.append((loss, int((target != -100).sum())))
        total = total + loss
        count += per_example[-1][1]
    (total / count).backward()
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[0][name], p.grad, atol=1e-6, rtol=1e-4)
    assert abs(result.losses[0] - float(total.detach()) / count) < 1e-5

    # a mean of micro-batch means would be another number (the test can tell them apart)
    order = sorted(per_example, key=lambda x: -x[1])  # the sampler puts longest first within the window
    mean_of_means = (sum(float(l.detach()) for l, _ in order[:2]) / sum(c for _, c in order[:2])
                     + sum(float(l.detach()) for l, _ in order[2:]) / sum(c for _, c in order[2:])) / 2
    assert abs(mean_of_means - float(total.detach()) / count) > 1e-3
