"""Resume is exact: 5 steps + checkpoint + rebuild-from-scratch + 5 steps == 10 uninterrupted steps, bit for bit."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ckpt_support import VOCAB, linear_setup, linear_step, tiny_llama
from lorakit import LoraConfig, wrap
from lorakit.train import checkpoint_lock, load_checkpoint, resume, save_checkpoint, trainable_parameters
from lorakit.train.rng import capture_rng_state, restore_rng_state

TOTAL, SPLIT, WARMUP = 10, 5, 3


@pytest.fixture
def one_thread():
    # One intra-op thread makes CPU reductions run in one fixed order, so reruns are bitwise equal.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _warmup_cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def _build(*, reverse: bool = False):
    """Fresh model, optimizer and scheduler. `reverse` lists parameters backwards inside each param group."""
    lora = wrap(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.2))
    lora.train()  # dropout on: the RNG state now shapes every step
    params = trainable_parameters(lora)
    a = [p for n, p in params.items() if ".lora_A." in n]
    b = [p for n, p in params.items() if ".lora_B." in n]
    if reverse:
        a, b = a[::-1], b[::-1]
    optimizer = torch.optim.AdamW([{"params": a, "weight_decay": 0.01}, {"params": b, "weight_decay": 0.0}],
                                  lr=2e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine)
    return lora, params, optimizer, scheduler


def _step(lora, optimizer, scheduler) -> float:
    length = random.randint(5, 9)  # python's RNG picks the length, torch's the tokens: both must resume
    ids = torch.randint(0, VOCAB, (2, length))
    loss = lora(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def test_resume_after_rebuild_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, one_thread):
    _seed_all(7)
    lora, params, optimizer, scheduler = _build()
    reference = [_step(lora, optimizer, scheduler) for _ in range(TOTAL)]
    reference_final = {n: p.detach().clone() for n, p in params.items()}

    _seed_all(7)
    lora, params, optimizer, scheduler = _build()
    first = [_step(lora, optimizer, scheduler) for _ in range(SPLIT)]
    with checkpoint_lock(tmp_path):
        save_checkpoint(tmp_path, SPLIT, params, optimizer, scheduler,
                        data_position={"epoch": 0, "samples_seen": 2 * SPLIT}, trainer_state={"step": SPLIT})
    del lora, params, optimizer, scheduler

    _seed_all(12345)  # a different RNG position than at the save: only the restore can bring it back
    lora, params, optimizer, scheduler = _build(reverse=True)
    state = resume(tmp_path, params, optimizer, scheduler)
    assert state.step == SPLIT and state.data_position == {"epoch": 0, "samples_seen": 2 * SPLIT}
    assert scheduler.last_epoch == SPLIT
    second = [_step(lora, optimizer, scheduler) for _ in range(TOTAL - SPLIT)]

    assert first + second == reference  # exact float equality, step by step
    for name, tensor in reference_final.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert any(float(t.abs().max()) > 0 for n, t in reference_final.items() if ".lora_B." in n)  # B trained


def test_resume_without_the_rng_state_would_diverge(tmp_path, one_thread):
    """Control for the test above: dropout and data draws really depend on the restored RNG."""
    _seed_all(7)
    lora, params, optimizer, scheduler = _build()
    for _ in range(SPLIT):
        _step(lora, optimizer, scheduler)
    with checkpoint_lock(tmp_path):
        path = save_checkpoint(tmp_path, SPLIT, params, optimizer, scheduler)
    restored = [_step(lora, optimizer, scheduler) for _ in range(2)]

    lora, params, optimizer, scheduler = _build()
    load_checkpoint(path, params, optimizer, scheduler)
    _seed_all(99)  # clobber the restored RNG
    assert [_step(lora, optimizer, scheduler) for _ in range(2)] != restored


def _draws() -> list:
    return [torch.rand(3).tolist(), torch.randn(2).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(2).tolist(), float(np.random.randn())]


def test_rng_state_round_trips_for_torch_python_and_numpy():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached second gaussian in both generators
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_rng_draws_after_a_checkpoint_restore_match_the_draws_after_the_save(tmp_path):
    model, params, optimizer = linear_setup()
    linear_step(model, optimizer)
    with checkpoint_lock(tmp_path):
        path = save_checkpoint(tmp_path, 1, params, optimizer)
    after_save = _draws()
    _draws()  # move on further
    model, params, optimizer = linear_setup(seed=5)
    load_checkpoint(path, params, optimizer)
    assert _draws() == after_save
