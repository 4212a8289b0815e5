"""choose_token draws from the distribution it reports: temperature-scaled softmax, cut to the top_p nucleus."""

import math

import pytest
import torch

from lorakit.infer.sampling import SamplingParams, choose_token, draw

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])


def _frequencies(params: SamplingParams, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(LOGITS))
    for _ in range(n):
        token, _ = choose_token(LOGITS, params, g)
        counts[token] += 1
    return counts / n


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    observed = _frequencies(SamplingParams(temperature=temperature))
    # 20000 draws: 4 standard errors of the largest probability are under 0.015
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


def test_top_p_keeps_the_nucleus_renormalised_and_never_draws_outside_it():
    probs = torch.softmax(LOGITS, dim=-1)
    # the mass before token 2 is 0.56 + 0.21 < 0.85, before token 3 0.90: tokens 0, 1 and 2 stay
    params = SamplingParams(temperature=1.0, top_p=0.85)
    observed = _frequencies(params)
    expected = torch.zeros_like(probs)
    expected[:3] = probs[:3] / probs[:3].sum()
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)
    assert observed[3:].sum() == 0


def test_logprob_is_the_drawn_tokens_under_the_tempered_softmax_before_top_p():
    g = torch.Generator().manual_seed(3)
    token, logprob = choose_token(LOGITS, SamplingParams(temperature=0.7, top_p=0.5), g)
    assert logprob == pytest.approx(float(torch.log_softmax(LOGITS / 0.7, dim=-1)[token]), abs=1e-6)


def test_draw_never_picks_a_zero_weight_entry_even_at_the_edges():
    weights = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    g = torch.Generator().manual_seed(1)
    assert {draw(weights, g) for _ in range(2000)} == {1, 3}
    assert draw(torch.tensor([0.0, 0.0, 1.0]), g) == 2


def test_same_seed_same_draws():
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=1.0)
    assert [choose_token(LOGITS, params, a)[0] for _ in range(50)] == [choose_token(LOGITS, params, b)[0] for _ in range(50)]
    assert not math.isnan(choose_token(LOGITS, params, a)[1])


def test_repetition_penalty_matches_transformers_processor():
    """The oracle: transformers' RepetitionPenaltyLogitsProcessor over the same prompt + completion ids."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from lorakit.infer.sampling import apply_penalties

    logits = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0, 1.5])
    prompt, completion = [0, 1, 1], [4, 0]
    for penalty in (1.3, 0.7):
        ours = apply_penalties(logits, prompt, completion, SamplingParams(repetition_penalty=penalty))
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + completion]), logits[None].clone())[0]
        torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_follow_openais_formula():
    """logit - frequency_penalty * count - presence_penalty * (count > 0), counted over the completion only."""
    from lorakit.infer.sampling import apply_penalties

    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    got = apply_penalties(logits, [3, 3, 3], [0, 2, 0], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    torch.testing.assert_close(got, torch.tensor([2.0 - 0.5 - 0.5, -1.0, 0.5 - 0.25 - 0.5, 0.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 0.0]))  # the engine's row is not changed in place
    assert not SamplingParams().penalised() and SamplingParams(frequency_penalty=-0.1).penalised()


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                          ("repetition_penalty", 0.0), ("logprobs", 21), ("logprobs", True)])
def test_bad_penalties_and_logprobs_are_named(field, value):
    problems = SamplingParams(**{field: value}).problems()
    assert len(problems) == 1 and problems[0].startswith(field)
