import pickle

import pytest

from radixserve.sampling.params import SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", True),
        ("max_new_tokens", 1.5),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", -3.0),
        ("presence_penalty", 2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.5),
        ("seed", 1.0),
        ("seed", True),
        ("stop", [""]),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", [True]),
        ("ignore_eos", 1),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("n", 0),
        ("n", True),
    ],
)
def test_validate_names_field_and_value(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as ei:
        p.validate()
    msg = str(ei.value)
    assert msg.startswith(field), msg
    assert repr(value) in msg, msg


def test_valid_boundaries_pass():
    SamplingParams().validate()
    SamplingParams(
        max_new_tokens=0, temperature=0, top_p=1.0, top_k=1, min_p=1.0,
        frequency_penalty=-2, presence_penalty=2, repetition_penalty=2.0, seed=0,
        stop=["x"], stop_token_ids=[0], top_logprobs=20, n=3,
    ).validate()


def test_temperature_message_format():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1\.0"):
        SamplingParams(temperature=-1.0).validate()


def test_stop_string_and_top_logprobs_imply_logprobs():
    p = SamplingParams(stop="END", top_logprobs=3)
    assert p.stop == ["END"]
    assert p.logprobs is True
    p.validate()


def test_from_dict():
    assert SamplingParams.from_dict(None) == SamplingParams()
    p = SamplingParams.from_dict({"temperature": 0.5, "top_k": 5, "stop": "a"})
    assert (p.temperature, p.top_k, p.stop) == (0.5, 5, ["a"])
    with pytest.raises(ValueError, match="bogus") as ei:
        SamplingParams.from_dict({"temperature": 0.5, "bogus": 1, "zzz": 2})
    assert "zzz" in str(ei.value)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy()
    assert not SamplingParams(temperature=0.7).is_greedy()


def test_pickle_roundtrip():
    p = SamplingParams(temperature=0.3, stop=["x"], seed=7)
    assert pickle.loads(pickle.dumps(p)) == p
