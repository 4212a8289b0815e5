"""The speed section (train/speed.py): the fast paths give the plain path's loss and LoRA gradients within
tolerance, what `auto` decides and why, and that fit undoes everything it turned on."""

from __future__ import annotations

import threading

import pytest
import torch

from lorakit import LoraConfig, wrap
from lorakit.config import SpeedConfig, load_run_config, run_config_from_dict
from lorakit.errors import ConfigError
from lorakit.lora.routing import current_routing, route_rows
from lorakit.train import loop
from lorakit.train.chunked_loss import _FrozenHeadLoss, lm_loss_sum
from lorakit.train import speed
from lorakit.train.compile_cache import INDUCTOR_ENV, layer_signature, use_persistent_cache
from lorakit.train.speed import COMPILE_MIN_STEPS, COMPILE_MIN_STEPS_WARM, setup_speed
from test_loop_support import config, toy_data
from tiny_models import VOCAB, build_model, randomize_lora

# torch.compile's tracer probes hasattr(tensor, "grad") on non-leaf tensors and hides the warning that raises with a
# showwarning hook (torch._logging.hide_warnings), which pyproject's "error" filter pre-empts. Ignored here only: the
# warning comes from C++ with its C++ location, so no module filter could tell torch's probe from our own code's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def own_inductor_cache(tmp_path_factory):
    """What these tests compile, and the markers of compiled layers, go to a cache of their own, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INDUCTOR_ENV, str(tmp_path_factory.mktemp("inductor")))
        yield


def _llama_lora(dtype=torch.float32, seed: int = 0, r: int = 4):
    model = build_model("llama", seed=seed).to(dtype)
    lm = wrap(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(lm)
    lm.train()
    return lm


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 16), generator=g)
    return {"input_ids": ids, "use_cache": False}, ids


def _loss_and_grads(lm, compiled: bool = False):
    inputs, labels = _batch()
    loss_sum, count = lm_loss_sum(lm, inputs, labels, 1024, compiled=compiled)
    (loss_sum / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    lm.zero_grad(set_to_none=True)
    return float(loss_sum.detach()) / count, grads


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        err = (a[name].float() - b[name].float()).norm() / b[name].float().norm().clamp(min=1e-12)
        assert err < rtol, (name, float(err))


# ---- adapter_compute ------------------------------------------------------------------------------------
def test_bf16_adapter_compute_matches_fp32_compute_within_bf16_rounding():
    lm = _llama_lora(torch.bfloat16)
    assert {p.dtype for n, p in lm.named_parameters() if p.requires_grad} == {torch.float32}
    loss_exact, grads_exact = _loss_and_grads(lm)
    lm.compute_adapters_in_base_dtype(True)
    loss_fast, grads_fast = _loss_and_grads(lm)
    assert loss_fast != loss_exact  # the path really changed (bf16 matmuls), ...
    assert abs(loss_fast - loss_exact) < 2e-3 * abs(loss_exact)  # ... by bf16 rounding only
    _close(grads_fast, grads_exact, rtol=3e-2)
    assert all(g.dtype == torch.float32 for g in grads_fast.values())  # the fp32 masters get the gradients


def test_adapter_compute_changes_nothing_when_base_and_adapter_share_a_dtype():
    lm = _llama_lora(torch.float32)
    loss_a, grads_a = _loss_and_grads(lm)
    lm.compute_adapters_in_base_dtype(True)
    loss_b, grads_b = _loss_and_grads(lm)
    assert loss_a == loss_b
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


# ---- the compiled loss and layers ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_loss_softmax_equals_the_eager_one(dtype, rtol):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, 16, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (37,), generator=g)
    results = []
    for compiled in (False, True):
        h = hidden.clone().requires_grad_()
        loss = _FrozenHeadLoss.apply(h, weight, None, targets, 10, compiled)  # 4 chunks, the last one short
        loss.backward()
        results.append((float(loss.detach()), h.grad.float()))
    (loss_eager, grad_eager), (loss_comp, grad_comp) = results
    assert abs(loss_comp - loss_eager) <= rtol * abs(loss_eager)
    assert (grad_comp - grad_eager).norm() / grad_eager.norm() < rtol


def test_compiled_layers_and_loss_give_the_plain_loss_and_grads_and_undo_restores_them():
    lm = _llama_lora(torch.float32)
    loss_plain, grads_plain = _loss_and_grads(lm)
    setup = setup_speed(lm, SpeedConfig(compile="on"), total_steps=1, checkpointing=False)
    assert setup.compiled
    layers = list(lm.model.model.layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    loss_comp, grads_comp = _loss_and_grads(lm, compiled=True)
    assert abs(loss_comp - loss_plain) < 1e-5 * abs(loss_plain)
    _close(grads_comp, grads_plain, rtol=1e-4)
    setup.undo()
    assert all(layer._compiled_call_impl is None for layer in layers)
    loss_after, _ = _loss_and_grads(lm)
    assert loss_after == loss_plain


# ---- what auto decides --------------------------------------------------------------------------------
def test_auto_skips_compiling_small_models_and_says_why():
    lm = _llama_lora()
    setup = setup_speed(lm, SpeedConfig(), total_steps=10 ** 6, checkpointing=False)
    assert not setup.compiled
    assert any("too few for compiling to pay off" in note for note in setup.notes)


def test_auto_compiles_long_runs_of_big_enough_models(monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_MIN_PARAMS", 0)  # the tiny model counts as big enough
    lm = _llama_lora()
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.suppress_errors
    setup = setup_speed(lm, SpeedConfig(), total_steps=COMPILE_MIN_STEPS, checkpointing=False)
    assert setup.compiled and all(layer._compiled_call_impl is not None for layer in lm.model.model.layers)
    assert dynamo_config.suppress_errors  # auto falls back to eager rather than failing the run
    setup.undo()
    assert dynamo_config.suppress_errors == before


def test_auto_skips_compiling_short_runs_and_says_why(monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_MIN_PARAMS", 0)
    lm = _llama_lora()
    setup = setup_speed(lm, SpeedConfig(), total_steps=COMPILE_MIN_STEPS - 1, checkpointing=False)
    assert not setup.compiled and setup.adapter_compute_in_base_dtype
    assert any(f"{COMPILE_MIN_STEPS - 1} steps" in note for note in setup.notes)
    assert all(layer._compiled_call_impl is None for layer in lm.model.model.layers)
    assert all(layer.compute_in_base_dtype for _, layer in lm.lora_layers())
    setup.undo()
    assert not any(layer.compute_in_base_dtype for _, layer in lm.lora_layers())


def test_after_a_compiled_run_auto_compiles_short_runs_of_the_same_layers(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_MIN_PARAMS", 0)
    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "inductor"))
    lm = _llama_lora()
    setup_speed(lm, SpeedConfig(compile="on"), total_steps=1, checkpointing=False).undo(steps_trained=1)
    short = setup_speed(lm, SpeedConfig(), total_steps=COMPILE_MIN_STEPS_WARM, checkpointing=False)
    assert not short.compiled  # one step may not have compiled the backward or a second length: not marked
    assert any(f"fewer than the {COMPILE_MIN_STEPS} that repay a first compile ({COMPILE_MIN_STEPS_WARM} once"
               in note for note in short.notes), short.notes
    short.undo()

    setup_speed(lm, SpeedConfig(compile="on"), total_steps=2, checkpointing=False).undo(steps_trained=2)
    assert (tmp_path / "inductor" / "lorakit-compiled-layers" / layer_signature(lm.model.model.layers[0])).is_file()
    warm = setup_speed(lm, SpeedConfig(), total_steps=COMPILE_MIN_STEPS_WARM, checkpointing=False)
    assert warm.compiled and any("inductor's cache holds these layers" in note for note in warm.notes)
    warm.undo(steps_trained=COMPILE_MIN_STEPS_WARM)
    shorter = setup_speed(lm, SpeedConfig(), total_steps=COMPILE_MIN_STEPS_WARM - 1, checkpointing=False)
    assert not shorter.compiled
    assert any(f"fewer than the {COMPILE_MIN_STEPS_WARM} that repay compiling from inductor's cache" in note
               for note in shorter.notes), shorter.notes
    other = _llama_lora(r=8)  # another rank: other shapes, graphs not in the cache
    assert layer_signature(other.model.model.layers[0]) != layer_signature(lm.model.model.layers[0])
    assert not setup_speed(other, SpeedConfig(), total_steps=COMPILE_MIN_STEPS_WARM, checkpointing=False).compiled


def test_inductor_caches_go_to_lorakits_cache_unless_the_user_chose_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lorakit"))
    monkeypatch.delenv(INDUCTOR_ENV)
    assert use_persistent_cache() == tmp_path / "lorakit" / "inductor"  # not /tmp, which a reboot empties
    import os

    assert os.environ[INDUCTOR_ENV] == str(tmp_path / "lorakit" / "inductor")  # what inductor reads
    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "mine"))
    assert use_persistent_cache() == tmp_path / "mine"


def test_a_second_compiled_run_takes_its_graphs_from_the_cache(tmp_path, monkeypatch):
    """What makes a second run compile in seconds: inductor's FX graph cache answers every graph of the layers
    (torch's own counters), after torch forgot everything in memory, as in a new process."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "inductor"))
    for run in ("first", "second"):
        torch._dynamo.reset()
        counters.clear()
        lines = []
        loop.fit(_llama_lora(), toy_data(n=8), config(max_steps=3, batch_size=2), tmp_path / run, log=lines.append,
                 speed=SpeedConfig(compile="on"))
        if run == "first":
            assert counters["inductor"]["fxgraph_cache_miss"] > 0 and any("first steps are slow" in l for l in lines)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and counters["inductor"]["fxgraph_cache_miss"] == 0
    assert any("inductor's cache holds these layers" in line for line in lines)


def test_auto_leaves_checkpointed_runs_uncompiled_and_on_refuses_them():
    lm = _llama_lora()
    setup = setup_speed(lm, SpeedConfig(), total_steps=10 ** 6, checkpointing=True)
    assert not setup.compiled and any("gradient_checkpointing" in note for note in setup.notes)
    with pytest.raises(ConfigError, match="speed.compile: on.*gradient_checkpointing.*auto.*off"):
        setup_speed(lm, SpeedConfig(compile="on"), total_steps=10 ** 6, checkpointing=True)


def test_compile_off_and_adapter_compute_adapter_change_nothing():
    lm = _llama_lora()
    setup = setup_speed(lm, SpeedConfig(compile="off", adapter_compute="adapter"), total_steps=10 ** 6,
                        checkpointing=False)
    assert not setup.compiled and not setup.adapter_compute_in_base_dtype and not setup.notes
    assert not any(layer.compute_in_base_dtype for _, layer in lm.lora_layers())


def test_fit_applies_the_speed_section_and_undoes_it(tmp_path):
    lm = _llama_lora(torch.bfloat16)
    seen = []

    def hook(event, info):
        if event == "step":
            seen.append(all(layer.compute_in_base_dtype for _, layer in lm.lora_layers()))

    lines = []
    loop.fit(lm, toy_data(n=4), config(max_steps=2, batch_size=2), tmp_path / "run", log=lines.append, hooks=[hook])
    assert seen == [True, True]  # on during the run (the default speed section)...
    assert not any(layer.compute_in_base_dtype for _, layer in lm.lora_layers())  # ... and off after it
    assert any("not compiling" in line for line in lines)  # 2 steps: auto explains why it did not compile


# ---- routing stays exact with the compile-friendly fast path ----------------------------------------------
def test_routing_is_seen_only_inside_its_block_and_its_thread():
    assert current_routing() is None
    inside, other_thread = [], []
    with route_rows(["a", "b"]):
        inside.append(current_routing())
        t = threading.Thread(target=lambda: other_thread.append(current_routing()))
        t.start()
        t.join()
    assert inside[0] is not None and inside[0].names == ["a", "b"]
    assert other_thread == [None]  # a block open in one thread is no routing for another
    assert current_routing() is None


# ---- config -----------------------------------------------------------------------------------------------
def test_speed_section_is_validated_with_clear_messages():
    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    assert run_config_from_dict(base).speed == SpeedConfig()
    ok = run_config_from_dict({**base, "speed": {"compile": "on", "adapter_compute": "adapter"}})
    assert ok.speed.compile == "on" and ok.speed.adapter_compute == "adapter"
    with pytest.raises(ConfigError) as err:
        run_config_from_dict({**base, "speed": {"compile": "yes", "complie": "on"}})
    text = str(err.value)
    assert "speed.compile: must be one of auto, on, off" in text
    assert "speed.complie: unknown key (did you mean 'compile'?)" in text



def test_yaml_on_and_off_mean_on_and_off(tmp_path):
    # YAML 1.1 reads a bare on/off as true/false; `compile: on` must still mean "on".
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nspeed:\n  compile: on\n")
    assert load_run_config(path).speed.compile == "on"
    assert load_run_config(path, ["speed.compile=off"]).speed.compile == "off"
