"""Rewards on known images: compressibility, legibility (shipped classifier), boldness, registry errors."""

import json
import shutil

import pytest
import torch

from diffblend.rewards import (UnknownRewardError, available_rewards, canonical_name, get_reward,
                               parse_reward_weights, register_reward, reward_info)
from diffblend.zoo.data import load_split, parse_digit


def _noise(b=4, seed=0):
    return torch.rand(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_builtins_and_aliases():
    assert set(available_rewards()) >= {"jpeg_compressibility", "legibility", "boldness"}
    assert canonical_name("compressibility") == "jpeg_compressibility"
    assert "higher" in reward_info()["legibility"]


@pytest.mark.parametrize("bad", ["foo", "legibilty", "", "__base__"])
def test_unknown_reward_names_are_refused_listing_the_allowed(bad):
    with pytest.raises(UnknownRewardError) as e:
        get_reward(bad)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "legibility" in str(e.value) and "jpeg_compressibility" in str(e.value)


@pytest.mark.parametrize("bad", ["legibility=", "legibility=abc", "=0.5", "legibility", "legibility=0.5,,boldness=0.5",
                                 "legibility=0.5,legibility=0.5", "legibility=-1,boldness=2", "legibility=nan",
                                 "legibility=0,boldness=0", " "])
def test_malformed_weight_strings_are_refused(bad):
    with pytest.raises(ValueError):
        parse_reward_weights(bad)


def test_weight_string_with_unknown_name_is_refused():
    with pytest.raises(UnknownRewardError):
        get_reward("legibility=0.5,sharpness=0.5")


def test_black_compresses_better_than_noise_and_scores_are_negative_kb():
    fn = get_reward("jpeg_compressibility")
    black, _ = fn(torch.zeros(2, 1, 16, 16), ["7", "7"], None)
    noise, info = fn(_noise(2), ["7", "7"], None)
    assert (black > noise).all()
    assert (noise < 0).all() and torch.allclose(-noise, info["jpeg_kb"])
    # a real digit sits in between: more than a blank canvas, less than uniform noise
    x, _ = load_split("test")
    digit, _ = fn(x[:2], ["0", "0"], None)
    assert (digit < black).all() and (digit > noise).all()


def test_compressibility_of_a_non_finite_image_is_nan():
    """A NaN image (e.g. a sampler run with eta > 1) is no image: NaN like the other rewards, not the
    best score a blank canvas would get (what its JPEG of zeros gave)."""
    x = torch.zeros(2, 1, 16, 16)
    x[1, 0, 3, 3] = float("nan")
    s, info = get_reward("jpeg_compressibility")(x, ["7", "7"], None)
    assert torch.isfinite(s[0]) and torch.isnan(s[1]) and torch.isnan(info["jpeg_kb"][1])


def test_compressibility_accepts_rgb_and_keeps_device_and_dtype():
    fn = get_reward("compressibility")
    s, _ = fn(torch.zeros(3, 3, 16, 16), ["1"] * 3, None)
    assert s.shape == (3,) and s.dtype == torch.float32


def test_boldness_is_mean_ink():
    fn = get_reward("boldness")
    s, _ = fn(torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16), torch.full((1, 16, 16), 0.25)]), [""] * 3, None)
    assert torch.allclose(s, torch.tensor([0.0, 1.0, 0.25]))


def test_legibility_scores_the_prompted_class_above_the_others_on_held_out_digits():
    fn = get_reward("legibility")
    x, y = load_split("test")
    x, y = x[:200], y[:200]
    right, info = fn(x, [str(int(d)) for d in y], None)
    wrong, _ = fn(x, [str(int((d + 1) % 10)) for d in y], None)
    assert (right <= 0).all()
    # held-out accuracy of the shipped classifier is 0.991 (450 images); on these 200 at most a
    # few may fail, so require 95 % of pairwise wins, not all
    assert (right > wrong).float().mean() >= 0.95
    assert info["correct"].mean() >= 0.95
    assert right.mean() > -0.1 and wrong.mean() < -3.0


def test_legibility_reads_digit_from_prompt_words_or_metadata():
    fn = get_reward("legibility")
    x, y = load_split("test")
    i = int((y == 7).nonzero()[0])
    a, _ = fn(x[i:i + 1], ["a digit seven"], None)
    b, _ = fn(x[i:i + 1], ["ignored 3"], [{"digit": 7}])
    c, _ = fn(x[i:i + 1], ["7"], None)
    assert torch.allclose(a, c) and torch.allclose(b, c)
    with pytest.raises(ValueError):
        fn(x[i:i + 1], ["a cat"], None)


def test_parse_digit():
    assert parse_digit("7") == 7 and parse_digit("the number Three") == 3 and parse_digit("a handwritten 0") == 0
    for bad in ("", "12", "3 and 4", "seven 8", "digit"):
        with pytest.raises(ValueError):
            parse_digit(bad)


def test_weighted_reward_is_the_weighted_sum_with_components():
    x, y = load_split("test")
    prompts = [str(int(d)) for d in y[:6]]
    fn = get_reward("compressibility=0.25,legibility=0.75")
    total, info = fn(x[:6], prompts, None)
    c, _ = get_reward("jpeg_compressibility")(x[:6], prompts, None)
    l, _ = get_reward("legibility")(x[:6], prompts, None)
    assert torch.allclose(total, 0.25 * c + 0.75 * l, atol=1e-6)
    assert set(info["components"]) == {"jpeg_compressibility", "legibility"}


def test_weighted_spec_refuses_factory_options():
    """Options of a weighted spec have no reward to go to; they were dropped without a word."""
    with pytest.raises(ValueError, match="options"):
        get_reward("jpeg_compressibility=0.5,boldness=0.5", quality=10)


def test_reward_folder_with_reward_json(tmp_path):
    from diffblend.zoo import weights_dir

    folder = tmp_path / "my_legibility"
    shutil.copytree(weights_dir("classifier"), folder)
    (folder / "reward.json").write_text(json.dumps({"factory": "legibility"}))
    x, y = load_split("test")
    prompts = [str(int(d)) for d in y[:4]]
    a, _ = get_reward(str(folder))(x[:4], prompts, None)
    b, _ = get_reward("legibility")(x[:4], prompts, None)
    assert torch.allclose(a, b)
    with pytest.raises(FileNotFoundError):
        get_reward(str(tmp_path / "nothing"))


def test_register_reward_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError):
        register_reward("legibility", "dup")(lambda device="cpu": None)
    with pytest.raises(ValueError):
        register_reward("a=b", "bad")(lambda device="cpu": None)


def test_correlations_match_scipy_and_detect_conflict():
    from scipy import stats

    from diffblend.rewards.analysis import reward_correlations

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g)
    b = -a + 0.5 * torch.randn(200, generator=g)
    c = torch.randint(0, 5, (200,), generator=g).float()  # ties
    rows = {(r["a"], r["b"]): r for r in reward_correlations({"a": a, "b": b, "c": c}, groups=["p"] * 200)}
    assert rows[("a", "b")]["pearson"] < -0.8  # built to conflict
    for (x, y), r in rows.items():
        vx, vy = ({"a": a, "b": b, "c": c}[k].double().numpy() for k in (x, y))  # scipy in float64
        assert abs(r["pearson"] - stats.pearsonr(vx, vy)[0]) < 1e-9
        assert abs(r["spearman"] - stats.spearmanr(vx, vy)[0]) < 1e-9
        assert abs(r["pearson_within"] - r["pearson"]) < 1e-9  # a single group: centring changes nothing
