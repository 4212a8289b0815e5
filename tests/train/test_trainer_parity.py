"""lorakit's training step computes what PEFT + the Hugging Face Trainer compute, given the same weights and batch.

Issue 15 compared the two on validation loss; these tests pin the step itself: the same base weights and adapter
init, one optimizer step over the same examples (every example in the one window, so the samplers' orders
cannot matter) -> the same loss, the same clipped LoRA gradients, the same weights after AdamW. Defaults of the
math that could differ silently are set on neither side: AdamW's betas/eps/weight decay, clipping at 1.0,
the loss normaliser over an accumulation window (the Trainer's num_items_in_batch), the label shift.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.data import collate
from lorakit.train import loop
from test_loop_support import config, lora_model, quiet, toy_data
from tiny_models import build_model


def _lorakit_step(tmp_path, data, **overrides):
    """(model, step-1 loss, {param: gradient the optimizer applied}) after one lorakit step."""
    seen = {}
    original = loop.build_optimizer

    def build(params, cfg, *rest):
        opt = original(params, cfg, *rest)
        opt.register_step_pre_hook(lambda o, a, kw: seen.update({n: p.grad.clone() for n, p in params.items()}))
        return opt

    model = lora_model(seed=3)
    model.save_adapter(tmp_path / "init")
    loop.build_optimizer = build
    try:
        result = loop.fit(model, data, config(**overrides), tmp_path / "lorakit", log=quiet)
    finally:
        loop.build_optimizer = original
    return model, result.losses[0], seen


def _trainer_step(tmp_path, data, *, batch_size, grad_accum, lr, max_grad_norm):
    """The same as _lorakit_step with PEFT + Trainer, from the adapter lorakit started from."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seen = {}

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # after clipping, as lorakit's
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    peft_model = PeftModel.from_pretrained(build_model("llama", seed=3), tmp_path / "init", is_trainable=True)
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in data.examples], "labels": [e.labels for e in data.examples]})
    pad = data.pad_token_id

    def collator(rows):  # lorakit's right padding, so both see identical tensors
        return collate([SimpleNamespace(input_ids=r["input_ids"], labels=r["labels"]) for r in rows], pad)

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=lr,
                             lr_scheduler_type="constant", max_grad_norm=max_grad_norm, report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Grads()])
    output = trainer.train()
    return peft_model, output.training_loss, seen


def _key(name: str) -> str:
    """lorakit's `model.<module>.lora_A.default` and PEFT's `base_model.model.<module>.lora_A.default.weight`."""
    return name.removeprefix("base_model.").removesuffix(".weight")


CASES = {
    # name: (examples, lengths, batch_size, grad_accum, max_grad_norm, loss_chunk_tokens)
    "one batch, clipped": (4, (14, 5, 11, 8), 4, 1, 1.0, None),
    "two micro-batches of unequal lengths": (4, (14, 5, 11, 8), 2, 2, 1e6, None),
    "chunked loss (lorakit's default path)": (4, (14, 5, 11, 8), 4, 1, 1.0, 5),
}


@pytest.mark.parametrize("case", CASES)
def test_one_step_matches_peft_and_trainer(case, tmp_path):
    n, lengths, batch_size, grad_accum, clip, chunk = CASES[case]
    data = toy_data(n, lengths=lengths, prompt=3)
    lr = 1e-3
    ours, our_loss, our_grads = _lorakit_step(tmp_path, data, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                                              max_grad_norm=clip, max_steps=1, loss_chunk_tokens=chunk)
    theirs, their_loss, their_grads = _trainer_step(tmp_path, data, batch_size=batch_size, grad_accum=grad_accum,
                                                    lr=lr, max_grad_norm=clip)
    assert abs(our_loss - their_loss) < 1e-5
    their_grads = {_key(n): g for n, g in their_grads.items()}
    assert set(their_grads) == set(our_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-4 for g in our_grads.values())  # the test compares real gradients
    after = {_key(n): p.detach() for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), after[name], atol=1e-6, rtol=1e-5, msg=name)
