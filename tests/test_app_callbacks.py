"""The app's callbacks without a browser: the embedded digits model, few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffblend.app import callbacks as cb
from diffblend.app import fronts
from diffblend.evaluate.records import read_records
from diffblend.zoo.generate import generate

RECORDS = Path(__file__).resolve().parents[1] / "docs" / "paper_comparison_digits" / "records.jsonl"
STEPS = 4
A, B = "jpeg_compressibility", "legibility"


@pytest.fixture(scope="module")
def session():
    return cb.make_session(records=str(RECORDS))


def test_weights_are_shown_renormalised(session):
    w = cb.blend_weights(session, [2.0, 1.0, 1.0])
    assert w == pytest.approx({A: 0.5, B: 0.25, "boldness": 0.25})
    assert cb.weights_text(w) == "w = jpeg_compressibility 0.50, legibility 0.25, boldness 0.25"
    with pytest.raises(ValueError, match="positive sum"):
        cb.blend_weights(session, [0, 0, 0])
    with pytest.raises(ValueError, match="got 2 weights for 3 adapters"):
        cb.blend_weights(session, [1, 1])


def test_generate_view_images_rewards_and_user_errors(session):
    view = cb.generate_view(session, [1, 1, 0], 1.0, "DB-MPA", "7", 3, STEPS, 2.0, num_images=2)
    assert len(view.images) == 2 and view.images[0].shape == (128, 128, 3) and view.images[0].dtype == np.uint8
    assert set(view.scores) == {A, B, "boldness"} and all(len(v) == 2 for v in view.scores.values())
    assert view.captions[1].startswith("seed 4 | ")
    # the page shows what the library gives for the same call
    want = generate(session.bp, ["7", "7"], {A: 0.5, B: 0.5, "boldness": 0.0}, seed=[3, 4], num_inference_steps=STEPS)
    got = torch.from_numpy(view.images[0][::8, ::8, 0].astype(np.float32) / 255)
    torch.testing.assert_close(got, want[0, 0], atol=1 / 255 + 1e-6, rtol=0)  # 8-bit rounding
    with pytest.raises(ValueError, match=r"lambda\) = 1.5 > 1"):
        cb.generate_view(session, [1, 1, 0], 1.5, "DB-MPA-LS", "7", 0, STEPS, 2.0)
    # a prompt the legibility reward cannot score shows n/a, not an error
    view = cb.generate_view(session, [1, 0, 0], 1.0, "Rewarded Soup", "a cat", 0, STEPS, 2.0)
    assert view.scores[B] == [None] and view.scores[A][0] is not None


@pytest.mark.parametrize("method", ["DB-MPA", "DB-MPA-LS", "Rewarded Soup"])
def test_strip_is_one_call_equal_to_separate_ones(session, method):
    view = cb.strip_view(session, A, B, 3, 1.0, method, "4", 5, STEPS, 2.0)
    assert [c.split(" | ")[0] for c in view.captions] == ["w(legibility) = 0.00", "w(legibility) = 0.50",
                                                          "w(legibility) = 1.00"]
    for j, t in enumerate((0.0, 0.5, 1.0)):
        alone = cb.generate_view(session, [1 - t, t, 0], 1.0, method, "4", 5, STEPS, 2.0)
        # same seed, same blend: the same image up to float round-off of a bigger batch (8-bit pixels)
        assert np.abs(view.images[j].astype(int) - alone.images[0].astype(int)).max() <= 1
    assert np.abs(view.images[0].astype(int) - view.images[2].astype(int)).max() > 20  # w did change it


def test_strip_refuses_bad_pairs(session):
    with pytest.raises(ValueError, match="two different adapters"):
        cb.strip_view(session, A, A, 3, 1.0, "mpa", "4", 0, STEPS, 2.0)
    with pytest.raises(ValueError, match="not loaded"):
        cb.strip_view(session, A, "nope", 3, 1.0, "mpa", "4", 0, STEPS, 2.0)


def test_reward_table_names_directions():
    table = cb.reward_table({A: [-1.2, None], B: [-0.01, -0.5]}, ["#0", "#1"])
    assert "| jpeg_compressibility | higher = more compressible | -1.200 | n/a |" in table
    assert "higher = more legible" in table


def test_fronts_choices_figure_and_point(session):
    recs = read_records(RECORDS)
    choices = fronts.front_choices(recs, A, B)
    assert choices[0][0].endswith("*front*") and any(k.startswith("mpa|") for _, k in choices)
    fig = fronts.front_figure(recs, A, B)
    assert fig.axes[0].get_xlabel().startswith(A)
    with pytest.raises(ValueError, match="two different rewards"):
        fronts.front_figure(recs, A, A)
    key = next(k for _, k in choices if k.startswith("mpa|"))
    text, view = fronts.point_view(session, key, STEPS, 2.0, num_images=2)
    assert "recorded images, mean rewards" in text and len(view.images) == 2
