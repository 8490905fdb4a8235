"""The one NAME=W,NAME=W parser used by the CLI, the reward registry and the trainer."""

import pytest

from diffblend.weights import parse_weights


def test_parses_in_order_and_strips_names():
    assert list(parse_weights(" b = 0.7, a=0.3").items()) == [("b", 0.7), ("a", 0.3)]


@pytest.mark.parametrize("text, match", [
    ("", "--weights is empty"),
    ("a=0.5,b", "item 'b' is malformed"),
    ("=0.5", "malformed"),
    ("a=0.5,a=0.5", "names 'a' twice"),
    ("a=x", "'x' is not a number"),
    ("a=inf", "finite number"),
    ("a=nan", "finite number"),
])
def test_refusals_name_the_argument_and_item(text, match):
    with pytest.raises(ValueError, match=match):
        parse_weights(text)


def test_nonnegative_and_argument_name():
    assert parse_weights("a=-1") == {"a": -1.0}  # the sign rule is the caller's (Blend.create refuses it)
    with pytest.raises(ValueError, match=r"reward item 'a=-1': the weight must be a finite number >= 0"):
        parse_weights("a=-1", what="reward", nonnegative=True)
