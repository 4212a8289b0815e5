"""lorakit's preference objectives compute what TRL 1.16's trainers compute, given the same weights and tokens.

Setup (fp32): a seeded 2-layer Llama (hidden 32) with the chatml test tokenizer's vocabulary, twice; a LoRA adapter
with random non-zero A and B saved by lorakit and loaded into both lorakit and PEFT; one batch prepared and collated
by lorakit, the same tensors given to TRL (built by TRL's own collators from lorakit's token ids, and checked equal).
Compared, per objective: the loss, the metrics both report (mean rewards, log-probs, margins, accuracies, KTO's
KL), and every LoRA gradient.
- dpo (sigmoid, ipo, hinge, robust) vs DPOTrainer: reference = the base with adapters disabled (TRL: a PeftModel
  with no "ref" adapter), or a frozen reference adapter (TRL: its "ref" copy of the starting adapter);
- simpo vs CPOTrainer(loss_type="simpo", cpo_alpha=0); orpo vs ORPOTrainer (its beta is our orpo_lambda);
- kto vs KTOTrainer, with the KL rows from lorakit's kl_ fields (TRL's KL partners checked against ours).
The pair batch holds a multi-turn conversation (system turn, an earlier exchange) and a prompt left-truncated to
max_prompt_len. The reference: base = a separate copy of the base; precomputed = live; a reference adapter = that
adapter merged into a copy of the base.

Conventions that differ, fed identically here:
- TRL's completion runs on past the end-of-turn token to what the chat template adds after it (chatml's newline);
  lorakit's stops at the end-of-turn token (as SFT supervises a reply), so TRL is given lorakit's tokens.
- TRL's ORPO cross-entropy covers prompt and completion (the ORPO authors' default; their disable_prompt_loss scores
  the completion alone, as lorakit does), so the whole ORPO loss is compared on one-token prompts, where the two
  coincide, and on full prompts the odds-ratio part (loss minus nll_loss) and the metrics.
- TRL 1.16's sigmoid loss ignores label_smoothing (lorakit's smoothed sigmoid is conservative DPO), so sigmoid is
  compared unsmoothed; robust and simpo with smoothing.
"""

from __future__ import annotations

import copy

import pytest
import torch

from data_helpers import CHATML_JINJA, build_tokenizer
from lorakit import LoraConfig, LoraModel, wrap
from lorakit.config import PreferenceConfig, TrainConfig
from lorakit.data import DataOptions
from lorakit.data.preference import Lengths, collate_preference, prepare_preference
from lorakit.train.objectives.preference import REFERENCE_ADAPTER, Preference, Reference
from tiny_models import randomize_lora

peft = pytest.importorskip("peft")
pytest.importorskip("trl")

# trl.experimental (CPOTrainer, ORPOTrainer) announces itself with a TRLExperimentalWarning on first import.
EXPERIMENTAL = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

CHUNK = 5  # lorakit's chunked log-probs (its default path), several chunks per batch
MAX_PROMPT = 60  # cuts the long prompt only
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "You are a terse helper."


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# TRL tokenizes its train_dataset in the constructor: all records conversational, so one Arrow schema holds them.
PAIRS = [
    {"prompt": user("What is two plus two?"), "chosen": assistant("It is four."), "rejected": assistant("Six.")},
    {"prompt": [{"role": "system", "content": SYSTEM}, *user("hello world"), *assistant("hi there"),
                *user("And three plus three?")],
     "chosen": assistant("Six."), "rejected": assistant("It is four, thanks for asking.")},
    {"prompt": user("hello world, how are you today? " * 8 + "say hi"), "chosen": assistant("hi there"),
     "rejected": assistant("The quick brown fox.")},
]
MULTI_TURN, TRUNCATED = 1, 2
UNPAIRED = [
    {"prompt": user("What is two plus two?"), "completion": assistant("It is four."), "label": True},
    {"prompt": [{"role": "system", "content": SYSTEM}, *user("hello world"), *assistant("hi there"),
                *user("And three plus three?")], "completion": assistant("Six."), "label": True},
    {"prompt": user("say hi"), "completion": assistant("The lazy dog."), "label": False},
    {"prompt": user("hello world, how are you today?"), "completion": assistant("I am fine, thanks for asking."),
     "label": False},
    {"prompt": user("print the end token"), "completion": assistant("quick brown fox"), "label": True},
]
KTO_BATCH = 4  # TRL's per-device batch: its KL partners rotate within blocks of it, as kl_partners does


# ---- models, adapters, data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CHATML_JINJA)


@pytest.fixture(scope="module")
def base(tokenizer):
    """The seeded base model; every test works on deep copies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """{"sft": a randomised adapter, "policy": the same plus more noise}, saved in PEFT's layout by lorakit."""
    root = tmp_path_factory.mktemp("adapters")
    model = wrap(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(model, seed=1, scale=0.3)
    model.save_adapter(root / "sft")
    randomize_lora(model, seed=2, scale=0.3)
    model.save_adapter(root / "policy")
    return {"sft": root / "sft", "policy": root / "policy"}


def lorakit_model(base, adapter, reference=None) -> LoraModel:
    """lorakit's policy: `adapter` trainable as "default" (and `reference` frozen beside it, as the recipe loads it)."""
    model = LoraModel(copy.deepcopy(base), None)
    model.load_adapter(adapter, "default", is_trainable=True)
    if reference is not None:
        model.load_adapter(reference, REFERENCE_ADAPTER)
    model.set_adapter("default")
    return model.train()


def peft_model(base, adapter):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter), is_trainable=True)


def pairs(tokenizer, max_prompt_len=MAX_PROMPT):
    return prepare_preference(PAIRS, tokenizer, DataOptions(template="auto"),
                              lengths=Lengths(128, max_prompt_len=max_prompt_len))


@pytest.fixture(scope="module")
def pair_data(tokenizer):
    return pairs(tokenizer)


@pytest.fixture(scope="module")
def kto_data(tokenizer):
    return prepare_preference(UNPAIRED, tokenizer, DataOptions(template="auto"), lengths=Lengths(128), paired=False)


def objective(kind, data, chunk=CHUNK, reference="base", batch_size=KTO_BATCH, **preference) -> Preference:
    return Preference(kind, data, TrainConfig(batch_size=batch_size, loss_chunk_tokens=chunk),
                      PreferenceConfig(**preference), Reference(reference, chunk))


# ---- one step on each side -----------------------------------------------------------------------------------------
def lorakit_step(objective: Preference, model, batch):
    """Backpropagate one window of one micro-batch; its WindowMetrics (loss and fields)."""
    normaliser = objective.normaliser([batch])
    out = objective.loss(model, batch, normaliser)
    out.term.backward()
    return objective.window_metrics(out.sums, normaliser)


def trl_args(config_class, tmp_path, batch_size, **settings):
    # activation_checkpointing is transformers 5's name; gradient_checkpointing=False would warn it is deprecated.
    return config_class(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, disable_tqdm=True,
                        activation_checkpointing=False, per_device_train_batch_size=batch_size, **settings)


def trl_trainer(trainer_class, config_class, tmp_path, model, records, tokenizer, *, base_reference=False,
                batch_size=None, **settings):
    from datasets import Dataset

    args = trl_args(config_class, tmp_path, batch_size or len(records), **settings)
    trainer = trainer_class(model=model, args=args,
                            train_dataset=Dataset.from_list(records), processing_class=copy.deepcopy(tokenizer))
    if base_reference:  # given a PeftModel, TRL copies its adapter as "ref"; without it, the reference is the base
        trainer.model.delete_adapter("ref")
    trainer.model.train()
    return trainer


def trl_metrics(trainer) -> dict[str, float]:
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


def trl_pair_inputs(data, indices, batch) -> dict[str, torch.Tensor]:
    """DPOTrainer's batch, collated by TRL from lorakit's token ids; the same tensors as lorakit's batch."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": data.examples[i].prompt_ids, "chosen_ids": data.examples[i].chosen_ids,
                 "rejected_ids": data.examples[i].rejected_ids} for i in indices]
    inputs = DataCollatorForPreference(pad_token_id=data.pad_token_id)(examples)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])
    assert torch.equal(inputs["completion_mask"].bool(), batch["labels"] != -100)
    return inputs


def trl_halves(batch) -> dict[str, torch.Tensor]:
    """CPOTrainer's / ORPOTrainer's batch: chosen_* and rejected_* input_ids, attention_mask and labels (-100 off
    the completion), the halves of lorakit's batch."""
    n = batch["input_ids"].shape[0] // 2
    halves = (("chosen", slice(None, n)), ("rejected", slice(n, None)))
    keys = ("input_ids", "attention_mask", "labels")
    return {f"{side}_{key}": batch[key][rows] for side, rows in halves for key in keys}


# ---- comparisons ---------------------------------------------------------------------------------------------------
def lora_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the trainable LoRA weights by module path: lorakit's `model.<module>.lora_A.default` and PEFT's
    `base_model.model.<module>.lora_A.default.weight` both map to `model.<module>.lora_A.default`."""
    return {name.removeprefix("base_model.").removesuffix(".weight"): p.grad
            for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours, theirs) -> None:
    ours, theirs = lora_grads(ours), lora_grads(theirs)
    assert ours and set(ours) == set(theirs)
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 1e-4  # real gradients, not a vacuous comparison of zeros
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def assert_same(ours: float, theirs: float, what: str, scale: float = 1.0) -> None:
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6 * max(scale, 1.0)), what


def assert_same_fields(ours, theirs: dict, keys, renamed: dict | None = None) -> None:
    """`ours` a WindowMetrics; the margin, a difference of rewards, within the sum of the two rewards' own
    tolerances: their fp32 rounding adds up in the difference (which thread count the matmuls ran with moves it)."""
    for key in keys:
        theirs_value = theirs[(renamed or {}).get(key, key)]
        if key == "rewards/margins":
            rewards = abs(ours.fields.get("rewards/chosen") or 0) + abs(ours.fields.get("rewards/rejected") or 0)
            assert ours.fields[key] == pytest.approx(theirs_value, rel=0, abs=1e-5 * rewards + 2e-6), key
        else:
            assert_same(ours.fields[key], theirs_value, key)


PAIR_FIELDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def summed_logps(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens from the full logits: an independent oracle."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (per_token * (targets != -100)).sum(1)


# ---- the data both sides see ---------------------------------------------------------------------------------------
def test_prompts_are_trls_tokens_a_long_one_keeping_its_last_max_prompt_len(tmp_path, base, adapters, tokenizer,
                                                                           pair_data):
    from trl import DPOConfig, DPOTrainer

    trainer = trl_trainer(DPOTrainer, DPOConfig, tmp_path, peft_model(base, adapters["sft"]), PAIRS, tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    theirs = list(trainer.train_dataset)  # TRL's own rendering and tokenization of the same records
    for i, (ours, their) in enumerate(zip(pair_data.examples, theirs)):
        if i == TRUNCATED:
            assert len(their["prompt_ids"]) > MAX_PROMPT + 10
            assert ours.prompt_ids == their["prompt_ids"][-MAX_PROMPT:]
        else:
            assert ours.prompt_ids == their["prompt_ids"]  # incl. the multi-turn one with its system turn
        # the convention difference: TRL scores the template's newline after the end-of-turn token too
        assert their["chosen_ids"] == ours.chosen_ids + newline and their["rejected_ids"] == ours.rejected_ids + newline
    system = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
    multi = pair_data.examples[MULTI_TURN].prompt_ids
    assert any(multi[i:i + len(system)] == system for i in range(len(multi)))


# ---- dpo -----------------------------------------------------------------------------------------------------------
DPO_CASES = [
    pytest.param(dict(loss_type="sigmoid", beta=0.5), CHUNK, id="sigmoid"),
    pytest.param(dict(loss_type="sigmoid", beta=0.5), None, id="sigmoid-full-logits"),
    pytest.param(dict(loss_type="ipo", beta=0.1), CHUNK, id="ipo"),
    pytest.param(dict(loss_type="hinge", beta=0.5), CHUNK, id="hinge"),
    pytest.param(dict(loss_type="robust", beta=0.5, label_smoothing=0.1), CHUNK, id="robust"),
]


@pytest.mark.parametrize("settings, chunk", DPO_CASES)
def test_dpo_against_the_base_matches_dpo_trainer(settings, chunk, tmp_path, base, adapters, tokenizer, pair_data):
    """The batch holds all three pairs: the multi-turn conversation and the left-truncated prompt included."""
    from trl import DPOConfig, DPOTrainer

    indices = [0, 1, 2]
    batch = collate_preference(pair_data, indices)
    ours = lorakit_model(base, adapters["policy"])
    our_metrics = lorakit_step(objective("dpo", pair_data, chunk, **settings), ours, batch)

    trainer = trl_trainer(DPOTrainer, DPOConfig, tmp_path, peft_model(base, adapters["policy"]), PAIRS, tokenizer,
                          base_reference=True, **settings)
    their_loss = trainer.compute_loss(trainer.model, trl_pair_inputs(pair_data, indices, batch))
    their_loss.backward()

    assert_same(our_metrics.loss, their_loss.item(), "loss")
    assert_same_fields(our_metrics, trl_metrics(trainer), PAIR_FIELDS)
    assert abs(our_metrics.fields["rewards/chosen"]) > 1e-3  # the policy is off the reference: rewards mean something
    assert_same_grads(ours, trainer.model)


def test_dpo_against_a_reference_adapter_matches_dpo_trainers_ref_copy(tmp_path, base, adapters, tokenizer, pair_data):
    """TRL, given a PeftModel, freezes a copy of its adapter as "ref"; lorakit loads the starting adapter again as
    "reference". Both policies then move off it (the "policy" weights), so a reference routed to the wrong adapter
    shows."""
    from trl import DPOConfig, DPOTrainer

    indices = [0, 1, 2]
    batch = collate_preference(pair_data, indices)
    settings = dict(loss_type="sigmoid", beta=0.5)
    ours = lorakit_model(base, adapters["policy"], reference=adapters["sft"])
    our_metrics = lorakit_step(objective("dpo", pair_data, reference="adapter", **settings), ours, batch)

    trainer = trl_trainer(DPOTrainer, DPOConfig, tmp_path, peft_model(base, adapters["sft"]), PAIRS, tokenizer,
                          **settings)
    assert "ref" in trainer.model.peft_config
    policy = dict(ours.named_parameters())
    with torch.no_grad():  # TRL's "default" moves to the policy weights; its "ref" stays the starting adapter
        for name, p in trainer.model.named_parameters():
            if ".default." in name:
                p.copy_(policy[name.removeprefix("base_model.").removesuffix(".weight")])
    their_loss = trainer.compute_loss(trainer.model, trl_pair_inputs(pair_data, indices, batch))
    their_loss.backward()

    assert_same(our_metrics.loss, their_loss.item(), "loss")
    assert_same_fields(our_metrics, trl_metrics(trainer), PAIR_FIELDS)
    assert abs(our_metrics.fields["rewards/chosen"]) > 1e-3
    assert_same_grads(ours, trainer.model)


# ---- simpo and orpo (no reference) ---------------------------------------------------------------------------------
@EXPERIMENTAL
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_cpo_trainer(smoothing, tmp_path, base, adapters, tokenizer, pair_data):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    batch = collate_preference(pair_data, [0, 1, 2])
    settings = dict(beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    ours = lorakit_model(base, adapters["policy"])
    simpo = objective("dpo", pair_data, reference="none", loss_type="simpo", **settings)
    our_metrics = lorakit_step(simpo, ours, batch)

    trainer = trl_trainer(CPOTrainer, CPOConfig, tmp_path, peft_model(base, adapters["policy"]), PAIRS, tokenizer,
                          loss_type="simpo", cpo_alpha=0.0, max_length=128, **settings)
    their_loss, their_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_halves(batch))
    their_loss.backward()

    assert_same(our_metrics.loss, their_loss.item(), "loss")
    assert_same_fields(our_metrics, their_metrics, PAIR_FIELDS)  # logps: mean per token, as CPO's average_log_prob
    assert_same_grads(ours, trainer.model)


def orpo_pair(tmp_path, base, adapters, tokenizer, data, orpo_lambda=0.25):
    """(our WindowMetrics, our model, TRL's loss, TRL's metrics, TRL's model) on one batch of every pair."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    batch = collate_preference(data, [0, 1, 2])
    ours = lorakit_model(base, adapters["policy"])
    our_metrics = lorakit_step(objective("orpo", data, reference="none", orpo_lambda=orpo_lambda), ours, batch)
    trainer = trl_trainer(ORPOTrainer, ORPOConfig, tmp_path, peft_model(base, adapters["policy"]), PAIRS, tokenizer,
                          beta=orpo_lambda, max_length=128)
    their_loss, their_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_halves(batch))
    their_loss.backward()
    return our_metrics, ours, their_loss.item(), their_metrics, trainer.model


@EXPERIMENTAL
def test_orpo_matches_orpo_trainer_where_its_nll_scores_the_completion_alone(tmp_path, base, adapters, tokenizer):
    """One-token prompts: TRL's cross-entropy over prompt and completion scores the completion alone (the first
    token is never predicted), as lorakit's does: the whole loss and its gradients must agree."""
    data = pairs(tokenizer, max_prompt_len=1)
    assert all(len(e.prompt_ids) == 1 for e in data.examples)
    ours, our_model, their_loss, theirs, their_model = orpo_pair(tmp_path, base, adapters, tokenizer, data)
    assert_same(ours.loss, their_loss, "loss")
    assert_same(ours.fields["nll_loss"], theirs["nll_loss"], "nll_loss")
    assert_same_fields(ours, theirs, PAIR_FIELDS + ("log_odds_chosen",))
    assert_same_grads(our_model, their_model)


@EXPERIMENTAL
def test_orpo_odds_ratio_term_matches_orpo_trainer_on_full_prompts(tmp_path, base, adapters, tokenizer, pair_data):
    """Full prompts: the cross-entropy conventions differ (see the module docstring); the odds-ratio term, the
    rewards and the mean log-probs do not."""
    ours, _, their_loss, theirs, _ = orpo_pair(tmp_path, base, adapters, tokenizer, pair_data)
    assert_same(ours.loss - ours.fields["nll_loss"], their_loss - theirs["nll_loss"], "odds-ratio term")
    assert_same_fields(ours, theirs, PAIR_FIELDS + ("log_odds_chosen",))


# ---- kto -----------------------------------------------------------------------------------------------------------
def test_kto_matches_kto_trainer(tmp_path, base, adapters, tokenizer, kto_data):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    settings = dict(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    ours_objective = objective("kto", kto_data, **settings)
    indices = list(range(KTO_BATCH))
    batch = collate_preference(kto_data, indices, ours_objective.partners)
    ours = lorakit_model(base, adapters["policy"])
    our_metrics = lorakit_step(ours_objective, ours, batch)

    trainer = trl_trainer(KTOTrainer, KTOConfig, tmp_path, peft_model(base, adapters["policy"]), UNPAIRED, tokenizer,
                          base_reference=True, batch_size=KTO_BATCH, **settings)
    their_rows = list(trainer.train_dataset)  # TRL rotates the completions within blocks of its batch size
    assert ours_objective.partners != list(range(len(UNPAIRED)))
    assert [row["KL_completion_ids"] for row in their_rows] == \
        [their_rows[p]["completion_ids"] for p in ours_objective.partners]
    examples = [{"prompt_ids": kto_data.examples[i].prompt_ids, "completion_ids": kto_data.examples[i].completion_ids,
                 "KL_completion_ids": kto_data.examples[ours_objective.partners[i]].completion_ids,
                 "label": kto_data.examples[i].desirable} for i in indices]
    inputs = DataCollatorForUnpairedPreference(pad_token_id=kto_data.pad_token_id)(examples)
    for prefix, theirs in (("", ""), ("kl_", "KL_")):
        assert torch.equal(inputs[f"{theirs}input_ids"], batch[f"{prefix}input_ids"])
        assert torch.equal(inputs[f"{theirs}attention_mask"], batch[f"{prefix}attention_mask"])
        assert torch.equal(inputs[f"{theirs}completion_mask"].bool(), batch[f"{prefix}labels"] != -100)
    assert torch.equal(inputs["label"], batch["desirable"])
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()

    their_metrics = trl_metrics(trainer)
    assert their_metrics["kl"] > 1e-3  # the KL estimate is above its clamp at 0: it takes part
    assert_same(our_metrics.loss, their_loss.item(), "loss")
    assert_same_fields(our_metrics, their_metrics, ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                    "logps/chosen", "logps/rejected", "kl"))
    assert_same_grads(ours, trainer.model)


# ---- the reference -------------------------------------------------------------------------------------------------
def test_base_reference_is_the_log_probs_of_a_separate_copy_of_the_base(base, adapters, pair_data):
    batch = collate_preference(pair_data, [0, 1, 2])
    model = lorakit_model(base, adapters["policy"])
    reference = Reference("base", CHUNK).log_probs(model, batch)
    expected = summed_logps(copy.deepcopy(base), batch)
    torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-5)
    assert (summed_logps(model, batch) - expected).abs().max() > 1e-2  # the adapter matters: disabling it shows


def test_reference_adapter_is_the_log_probs_of_that_adapter_merged_into_a_copy_of_the_base(base, adapters, pair_data):
    batch = collate_preference(pair_data, [0, 1, 2])
    model = lorakit_model(base, adapters["policy"], reference=adapters["sft"])
    reference = Reference("adapter", CHUNK).log_probs(model, batch)
    merged = peft_model(base, adapters["sft"]).merge_and_unload()  # PEFT merges: an oracle apart from lorakit
    expected = summed_logps(merged, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-6, atol=1e-5)
    assert (summed_logps(model, batch) - expected).abs().max() > 1e-2  # not the policy's
    assert (summed_logps(base, batch) - expected).abs().max() > 1e-2  # nor the base's
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_precomputed_reference_gives_the_live_references_loss(kind, base, adapters, pair_data, kto_data):
    """Precomputed over batches of 2 in the sampler's order; the batch scored takes examples out of that order."""
    data = pair_data if kind == "dpo" else kto_data
    live, precomputed = (objective(kind, data, batch_size=2, beta=0.5) for _ in range(2))
    precomputed.precompute_reference(lorakit_model(base, adapters["policy"]), log=lambda line: None)
    assert precomputed.precomputed["train"].shape == (len(data.examples), 2)
    batch = collate_preference(data, [2, 0], live.partners)
    live_model, precomputed_model = lorakit_model(base, adapters["policy"]), lorakit_model(base, adapters["policy"])
    expected = lorakit_step(live, live_model, batch)
    got = lorakit_step(precomputed, precomputed_model, batch)
    assert_same(got.loss, expected.loss, "loss")
    assert_same_fields(got, expected.fields, [k for k in expected.fields if expected.fields[k] is not None])
    assert abs(expected.fields["rewards/chosen"]) > 1e-3
    assert_same_grads(precomputed_model, live_model)
