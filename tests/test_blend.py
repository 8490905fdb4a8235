"""Blend maths: coefficients, combination, LS draws, and every validation error."""

import math

import pytest
import torch

from diffblend.core import BASE, Blend, blend_denoisers, combine, ls_choices, step_key

NAMES = ["aesthetic", "align", "jpeg"]


def test_coefficients_joint_mpa_kla():
    b = Blend.create({"aesthetic": 0.2, "align": 0.3, "jpeg": 0.5}, NAMES, kl_strength=1.5)
    c = b.coefficients()
    assert torch.allclose(c, torch.tensor([-0.5, 0.3, 0.45, 0.75], dtype=torch.float64))
    assert math.isclose(float(c.sum()), 1.0)  # affine combination: coefficients always sum to 1
    assert b.model_names == (BASE, *NAMES)


def test_base_drops_out_at_lambda_one_and_zero_weights_are_inactive():
    b = Blend.create({"align": 1.0}, NAMES)
    assert b.active() == [("align", 1.0)]
    assert Blend.create([0.5, 0.5, 0.0], NAMES).active() == [("aesthetic", 0.5), ("align", 0.5)]
    assert Blend.create([0.5, 0.5, 0.0], NAMES, kl_strength=0.0).active() == [(BASE, 1.0)]


def test_dict_and_list_forms_agree_and_missing_names_get_zero():
    a = Blend.create({"jpeg": 0.25, "aesthetic": 0.75}, NAMES)
    b = Blend.create([0.75, 0.0, 0.25], NAMES)
    assert a == b
    assert Blend.create({"x": 0.5, "y": 0.5}).names == ("x", "y")  # names from the dict


def test_normalize():
    b = Blend.create([1, 3, 0], NAMES, normalize=True)
    assert b.weights == (0.25, 0.75, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=[0.5, 0.5]), "weights has 2 entries but there are 3 adapters"),
        (dict(weights={"nope": 1.0}), "unknown adapter"),
        (dict(weights={BASE: 0.5, "align": 0.5}), "must not name '__base__'"),
        (dict(weights=[float("nan"), 0.5, 0.5]), "must be finite"),
        (dict(weights=[float("inf"), 0.5, 0.5]), "must be finite"),
        (dict(weights=[-0.5, 1.0, 0.5]), "must be >= 0"),
        (dict(weights=[0.5, 0.6, 0.0]), "must sum to 1"),
        (dict(weights=[0.0, 0.0, 0.0], normalize=True), "positive sum"),
        (dict(weights=[1, 0, 0], kl_strength=-0.1), r"kl_strength \(lambda\) must be >= 0"),
        (dict(weights=[1, 0, 0], kl_strength=float("nan")), "must be finite"),
        (dict(weights=[1, 0, 0], method="avg"), "method must be one of"),
        (dict(weights=[1, 0, 0], method="ls", kl_strength=1.5), "use method='mpa'"),
        (dict(weights=[1, 0, 0], seed=1.5), "seed must be an int"),
        (dict(weights=["a", 0, 0]), "must be a real number"),
    ],
)
def test_validation_errors(kwargs, match):
    weights = kwargs.pop("weights")
    with pytest.raises(ValueError, match=match):
        Blend.create(weights, NAMES, **kwargs)


def test_validation_errors_on_names():
    with pytest.raises(ValueError, match="adapter_names is required"):
        Blend.create([1.0])
    with pytest.raises(ValueError, match="unique"):
        Blend.create([0.5, 0.5], ["a", "a"])
    with pytest.raises(ValueError, match="must not contain"):
        Blend.create([0.5, 0.5], [BASE, "a"])


def test_ls_allows_lambda_up_to_one():
    b = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", kl_strength=0.5)
    assert (b.coefficients() >= 0).all()


def test_combine_matches_manual_sum_and_per_sample_coefficients():
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(3, 4, 2, 5, 5, generator=g)
    c = torch.tensor([-0.5, 0.7, 0.8])
    assert torch.allclose(combine(preds, c), -0.5 * preds[0] + 0.7 * preds[1] + 0.8 * preds[2], atol=1e-6)
    per = torch.rand(3, 4, generator=g)
    ref = torch.stack([sum(per[k, b] * preds[k, b] for k in range(3)) for b in range(4)])
    assert torch.allclose(combine(list(preds), per), ref, atol=1e-6)
    with pytest.raises(ValueError, match="coeffs has 2 entries"):
        combine(preds, [0.5, 0.5])


def _toy_models():
    # three affine "denoisers" that differ, so one-hot and base checks can fail
    def make(a, b):
        return lambda x, t, cond: a * x + b + 0.001 * t.reshape(-1, 1).to(x.dtype)

    return {BASE: make(1.0, 0.0), "aesthetic": make(2.0, 1.0), "align": make(-1.0, 3.0), "jpeg": make(0.5, -2.0)}


def test_one_hot_blend_equals_single_model_and_lambda_zero_equals_base():
    models = _toy_models()
    x, t = torch.randn(6, 3), torch.full((6,), 500)
    for name in NAMES:
        for method in ("mpa", "ls"):
            d = blend_denoisers(models, Blend.create({name: 1.0}, NAMES, method=method))
            assert torch.equal(d(x, t, None), models[name](x, t, None))
    for method in ("mpa", "ls"):
        d = blend_denoisers(models, Blend.create([0.3, 0.3, 0.4], NAMES, kl_strength=0.0, method=method))
        assert torch.equal(d(x, t, None), models[BASE](x, t, None))


def test_mpa_denoiser_equals_separate_forwards():
    models = _toy_models()
    x, t = torch.randn(4, 3), torch.full((4,), 10)
    b = Blend.create([0.2, 0.3, 0.5], NAMES, kl_strength=1.7)
    ref = sum(c * models[n](x, t, None) for n, c in zip(b.model_names, b.coefficients().tolist()))
    assert torch.allclose(blend_denoisers(models, b)(x, t, None), ref, atol=1e-6)


def test_base_is_not_needed_at_lambda_one():
    models = _toy_models()
    del models[BASE]
    d = blend_denoisers(models, Blend.create([0.2, 0.3, 0.5], NAMES))
    d(torch.randn(2, 3), torch.full((2,), 1), None)
    with pytest.raises(ValueError, match="missing models"):
        blend_denoisers(models, Blend.create([0.2, 0.3, 0.5], NAMES, kl_strength=0.5))


def test_ls_choices_are_keyed_on_seed_step_and_sample_index():
    c = Blend.create([0.2, 0.3, 0.5], NAMES, kl_strength=0.8).coefficients()
    a = ls_choices(c, seed=3, step=7, num_samples=10)
    assert torch.equal(a, ls_choices(c, seed=3, step=7, num_samples=10))  # reproducible
    assert torch.equal(a[:4], ls_choices(c, seed=3, step=7, num_samples=4))  # batch-size independent
    assert not torch.equal(ls_choices(c, 3, 7, 200), ls_choices(c, 3, 8, 200))  # step matters
    assert not torch.equal(ls_choices(c, 3, 7, 200), ls_choices(c, 4, 7, 200))  # seed matters


def test_ls_choice_frequencies_match_coefficients():
    # 40k draws: the std of a frequency is <= sqrt(0.25 / 40000) = 0.0025; 4 sigma = 0.01
    c = Blend.create([0.0, 0.3, 0.7], NAMES, kl_strength=0.6).coefficients()
    counts = torch.zeros(4)
    for step in range(40):
        counts += torch.bincount(ls_choices(c, seed=0, step=step, num_samples=1000), minlength=4)
    freq = counts / counts.sum()
    assert freq[1] == 0  # a zero coefficient is never drawn
    assert torch.allclose(freq.double(), c, atol=0.01)


def test_ls_denoiser_runs_one_model_per_sample():
    models = _toy_models()
    calls = []

    def counting(name):
        def f(x, t, cond):
            calls.append((name, x.shape[0]))
            return models[name](x, t, cond)
        return f

    b = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", seed=1)
    d = blend_denoisers({n: counting(n) for n in models}, b)
    x, t = torch.randn(64, 3), torch.full((64,), 300)
    out = d(x, t, None)
    assert sum(n for _, n in calls) == 64  # one forward per sample in total
    choice = ls_choices(b.coefficients(), b.seed, step_key(t), 64)
    assert len(set(choice.tolist())) == 2  # both adapters drawn in this batch (seeded)
    for i in range(64):
        name = b.model_names[int(choice[i])]
        assert torch.equal(out[i], models[name](x[i : i + 1], t[i : i + 1], None)[0])


def test_soup_is_not_a_prediction_blend():
    with pytest.raises(ValueError, match="soup"):
        blend_denoisers(_toy_models(), Blend.create([1, 0, 0], NAMES, method="soup"))


def test_ls_sample_keys_make_a_draw_follow_its_sample():
    c = Blend.create([0.2, 0.3, 0.5], NAMES, kl_strength=0.8).coefficients()
    keys = [101, 7, 55, 3, 900, 42]
    a = ls_choices(c, seed=3, step=7, num_samples=6, sample_keys=keys)
    perm = [5, 2, 0, 4, 1, 3]
    b = ls_choices(c, seed=3, step=7, num_samples=6, sample_keys=[keys[i] for i in perm])
    assert torch.equal(b, a[perm])  # reorder the samples: the draws move with them
    assert torch.equal(a[2:4], ls_choices(c, 3, 7, 2, sample_keys=keys[2:4]))  # any batch split
    # still distributed as c: 20k keyed draws, 4 sigma <= 4 * sqrt(0.25 / 20000) = 0.014
    many = ls_choices(c, seed=0, step=1, num_samples=20000, sample_keys=list(range(20000)))
    assert torch.allclose(torch.bincount(many, minlength=4).double() / 20000, c, atol=0.014)
    with pytest.raises(ValueError, match="sample_keys has 2 keys for 3 samples"):
        ls_choices(c, 0, 0, 3, sample_keys=[1, 2])


def test_blend_sample_keys_key_the_ls_denoiser():
    models = _toy_models()
    keys = (11, 12, 13, 14, 15, 16, 17, 18)
    b = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", seed=4, sample_keys=keys)
    x, t = torch.randn(8, 3), torch.full((8,), 300)
    out = blend_denoisers(models, b)(x, t, None)
    rev = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", seed=4, sample_keys=keys[::-1])
    assert torch.equal(blend_denoisers(models, rev)(x.flip(0), t, None), out.flip(0))
    with pytest.raises(ValueError, match="sample_keys must be integers"):
        Blend.create([1, 0, 0], NAMES, sample_keys=[1.5])
    with pytest.raises(ValueError, match="sample_keys has 8 keys for 2 samples"):
        blend_denoisers(models, b)(x[:2], t[:2], None)


def test_guidance_around_an_ls_blend_shares_one_draw_per_sample():
    """CFG outside a blend (core.sample's guidance_scale): the blend sees [uncond (B); cond (B)].
    An LS blend must give rows j and B + j one draw (groups=2), so each sample is guided with one
    model; a groups=1 LS blend would draw the halves independently (and fail with sample_keys),
    so it is refused with the fix in the message. For MPA guidance is linear."""
    from diffblend.core import NoiseSchedule, cfg_denoiser, sample

    models = {n: (lambda f: lambda x, t, c: f(x, t, c) * c.reshape(-1, 1))(f) for n, f in _toy_models().items()}
    B = 16
    x, t = torch.randn(B, 3), torch.full((B,), 300)
    cond, uncond = torch.full((B,), 2.0), torch.full((B,), 0.5)
    keys = tuple(range(100, 100 + B))
    for sample_keys in (None, keys):
        ls = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", kl_strength=0.8, seed=2, sample_keys=sample_keys)
        with pytest.raises(ValueError, match="groups=2"):
            cfg_denoiser(blend_denoisers(models, ls), 3.0, uncond)
        with pytest.raises(ValueError, match="groups=2"):
            sample(blend_denoisers(models, ls), x, NoiseSchedule.linear(1000), [300], cond, guidance_scale=3.0,
                   uncond=uncond)
        out = cfg_denoiser(blend_denoisers(models, ls, groups=2), 3.0, uncond)(x, t, cond)
        choice = ls.choices(step_key(t), B)
        assert len(set(choice.tolist())) == 3  # base and both adapters drawn (seeded)
        for i in range(B):
            one = cfg_denoiser(models[ls.model_names[int(choice[i])]], 3.0, uncond[i:i + 1])
            assert torch.allclose(out[i], one(x[i:i + 1], t[i:i + 1], cond[i:i + 1])[0], atol=1e-6)
    mpa = Blend.create([0.5, 0.5, 0.0], NAMES, kl_strength=0.8)
    guided = {n: cfg_denoiser(f, 3.0, uncond) for n, f in models.items()}
    assert torch.allclose(cfg_denoiser(blend_denoisers(models, mpa), 3.0, uncond)(x, t, cond),
                          blend_denoisers(guided, mpa)(x, t, cond), atol=1e-5)
    with pytest.raises(ValueError, match="groups must be an int"):
        blend_denoisers(models, mpa, groups=0)
    with pytest.raises(ValueError, match="not 2 stacked groups"):
        blend_denoisers(models, ls, groups=2)(x[:3], t[:3], cond[:3])


def test_ls_accepts_lambda_one_up_to_round_off_and_can_draw():
    lam = (79 / 10) * (10 / 79)  # 1.0000000000000002: accepted by create(), so it must also sample
    assert lam > 1
    b = Blend.create([0.5, 0.5, 0.0], NAMES, method="ls", kl_strength=lam)
    assert b.kl_strength == 1.0 and (b.coefficients() >= 0).all()
    assert b.choices(step=3, num_samples=8).shape == (8,)


def test_weights_within_tolerance_are_renormalised_so_coefficients_sum_to_one():
    b = Blend.create([0.3333333, 0.3333333, 0.3333333], NAMES, kl_strength=1.5)
    assert abs(float(b.coefficients().sum()) - 1.0) < 1e-15  # an affine combination, not a shrunk one
    assert abs(sum(b.weights) - 1.0) < 1e-15
