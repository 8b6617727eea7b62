"""SamplingParams validation (errors name the field) and Sequence's prompt/output views."""

import dataclasses

import pytest
from fake_engine import make_seq

from engine.core.sequence import SequenceStatus
from engine.sampling_params import SamplingParams


# -- SamplingParams and Sequence ---------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.5), ("temperature", -0.1), ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.1), ("presence_penalty", -2.1), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("min_tokens", -1), ("min_tokens", 65), ("logprobs", -1),
    ("logprobs", 21), ("n", 0), ("n", 65), ("stop", ("ok", "")), ("stop", ""), ("stop_token_ids", (3, -1)),
    ("temperature", float("inf")), ("repetition_penalty", float("inf")), ("top_p", float("nan")),
    ("presence_penalty", float("-inf")), ("stop", ("a", "b", "c", "d", "e")), ("stop", ("x" * 1025,)),
    ("seed", 2**63), ("seed", -2**63 - 1),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kw", [
    {"max_tokens": 1}, {"temperature": 0.0}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0},
    {"presence_penalty": -2.0}, {"frequency_penalty": 2.0}, {"min_tokens": 64}, {"logprobs": 0},
    {"logprobs": 20}, {"n": 64}, {"stop_token_ids": (0,)}, {"stop": ("a", "b", "c", "x" * 1024)},
    {"seed": 2**63 - 1}, {"seed": -2**63},
])
def test_sampling_params_boundaries_are_accepted(kw):
    SamplingParams(**kw)


def test_sampling_params_normalise_stop_and_are_frozen():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    many = SamplingParams(stop_token_ids=[7, 3] * 100_000)  # deduplicated: checked per token as a set
    assert many.stop_token_ids == (7, 3) and many.stop_token_set == {3, 7}
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().max_tokens = 3


def test_sequence_views_split_prompt_and_output():
    seq = make_seq(0, [1, 2, 3])
    seq.token_ids += [7, 8]
    assert seq.num_tokens == 5 and seq.output_token_ids == [7, 8] and seq.num_output_tokens == 2
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
