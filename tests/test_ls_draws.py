"""Stratified DB-MPA-LS draws (Blend ls_draws): same per-step law as iid, far less spread of each
sample's mix over its run, the step grid from the sampler or the pipeline's scheduler."""

import math

import pytest
import torch

import diffblend.adapters.blender as blender_mod
from diffblend.core import Blend, NoiseSchedule, blend_denoisers, ls_choices, randn, sample, step_key, stratified_choices
from diffblend.pipeline import BlendPipeline
from diffblend.toybench import default_problem, null_energy_distance, sliced_energy_distance
from helpers_pipelines import save_random_lora, tiny_sd

NAMES = ["a", "b", "c"]
KINDS = ["stratified", "golden"]


def _plan(kind, c, T, B, keys=None):
    return torch.stack([stratified_choices(c, 3, i, T, B, sample_keys=keys, kind=kind) for i in range(T)], 1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_draw_is_categorical_c(kind):
    """Each step's draw over 20000 samples: frequencies within 4.5 standard errors of c (a false alarm
    has probability ~7e-6 per frequency; 40 frequencies tested)."""
    c = Blend.create([0.2, 0.3, 0.5], NAMES, kl_strength=0.8).coefficients()  # [0.2, 0.16, 0.24, 0.4]
    T, B = 10, 20000
    plan = _plan(kind, c, T, B)
    freq = torch.stack([torch.bincount(plan[:, i], minlength=4) for i in range(T)]).double() / B  # (T, K)
    se = (c * (1 - c) / B).sqrt()
    assert ((freq - c).abs() < 4.5 * se).all(), (freq - c) / se


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [7, 20, 50])
def test_each_sample_runs_each_model_about_T_c_times(kind, T):
    c = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64)
    counts = torch.stack([torch.bincount(row, minlength=3) for row in _plan(kind, c, T, 500)]).double()
    assert (counts[:, 0] == 0).all()  # a zero coefficient is never drawn
    dev = (counts - T * c).abs().max()
    # systematic allocation: within 1 by construction; the golden rotation: within 2 (measured max
    # 1.7 at these T; the Kronecker sequence's discrepancy grows like log T)
    assert dev < (1.0 if kind == "stratified" else 2.0), dev
    # each sample's share of model 1: iid draws give std sqrt(c (1 - c) / T) over samples; here the
    # share is within dev / T of c (measured: 0.52x iid's std for golden at T = 7, far less beyond)
    assert (counts[:, 1] / T).std() < 0.6 * math.sqrt(0.3 * 0.7 / T)


@pytest.mark.parametrize("kind", KINDS)
def test_keys_batch_independence_and_reproducibility(kind):
    c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    a = _plan(kind, c, 12, 16)
    assert torch.equal(a, _plan(kind, c, 12, 16))
    assert torch.equal(a[:5], _plan(kind, c, 12, 5))  # a row's draws do not depend on the batch size
    keys = [101, 7, 55, 3]
    k = _plan(kind, c, 12, 4, keys)
    assert torch.equal(_plan(kind, c, 12, 4, keys[::-1]), k.flip(0))  # draws follow their sample
    assert not torch.equal(_plan(kind, c, 12, 4, keys), _plan(kind, c, 12, 4, [1, 2, 3, 4]))


def test_blend_learns_the_grid_and_iid_is_unchanged():
    ts = torch.tensor([999, 700, 300, 100, 0])
    iid = Blend.create([0.2, 0.3, 0.5], NAMES, method="ls", seed=4)
    assert iid.ls_draws == "iid" and "ls_draws" not in iid.as_dict()
    assert torch.equal(iid.choices(step_key(700), 8), ls_choices(iid.coefficients(), 4, step_key(700), 8))
    s = Blend.create([0.2, 0.3, 0.5], NAMES, method="ls", seed=4, ls_draws="stratified", timesteps=ts)
    assert s.timesteps == tuple(step_key(t) for t in ts)
    assert torch.equal(s.choices(step_key(300), 8), stratified_choices(s.coefficients(), 4, 2, 5, 8))
    assert s == Blend.create([0.2, 0.3, 0.5], NAMES, method="ls", seed=4, ls_draws="stratified").on_grid(ts)
    assert s.on_grid([999, 999, 500]).timesteps == (999000, 500000)  # repeats (2nd-order solvers) count once
    with pytest.raises(ValueError, match="needs the run's step grid"):
        Blend.create([1, 0, 0], NAMES, method="ls", ls_draws="golden").choices(0, 2)
    with pytest.raises(ValueError, match="not on the blend's step grid"):
        s.choices(step_key(500), 2)
    with pytest.raises(ValueError, match="ls_draws must be one of"):
        Blend.create([1, 0, 0], NAMES, method="ls", ls_draws="sobol")
    with pytest.raises(ValueError, match="applies to method 'ls' only"):
        Blend.create([1, 0, 0], NAMES, ls_draws="stratified")
    with pytest.raises(ValueError, match="index must be in"):
        stratified_choices(s.coefficients(), 0, 5, 5, 2)


def test_stratified_ls_keeps_prop2_on_the_exact_toy():
    """LS with stratified draws vs MPA on exact models, w = 1/2, 50 steps, N = 2000: below 8 times the
    pooled Monte-Carlo floor (the null threshold of tests/test_toybench.py; measured 2.5 here)."""
    p, N, steps = default_problem(), 2000, 50
    den = {n: p.base.tilt(r, 1.0).denoiser(p.schedule) for n, r in p.rewards.items()}
    ts = p.schedule.timesteps(steps)
    outs = []
    for k, blend in enumerate([Blend.create({"right": 0.5, "corner": 0.5}, list(p.rewards)),
                               Blend.create({"right": 0.5, "corner": 0.5}, list(p.rewards), method="ls",
                                            ls_draws="stratified", timesteps=ts)]):
        g = torch.Generator().manual_seed(10 + k)
        x = randn((N, 2), g, dtype=torch.float64)
        outs.append(sample(blend_denoisers(den, blend), x, p.schedule, ts, generators=g).sample)
    floor = null_energy_distance(torch.cat(outs), N, N, 16)
    assert sliced_energy_distance(outs[0], outs[1], 16) < 8.0 * floor


def test_blend_pipeline_reads_the_grid_from_its_scheduler(tmp_path, monkeypatch):
    """ls_draws='stratified' through BlendPipeline: with 4 steps and w = (1/2, 1/2), each image runs
    each adapter exactly twice (iid draws would give 0-4), in both CFG halves alike."""
    pipe = tiny_sd(tmp_path)
    bp = BlendPipeline(pipe, {n: save_random_lora(pipe, tmp_path / n, seed=i + 1) for i, n in enumerate("xy")},
                       mode="batched")
    routes = []
    real = blender_mod.Blender._ls_batched

    def spy(blender, forward, call, per_row, names, B):
        routes.append(per_row.clone())
        return real(blender, forward, call, per_row, names, B)

    monkeypatch.setattr(blender_mod.Blender, "_ls_batched", spy)
    B, steps = 6, 4
    bp(prompt=["p"] * B, weights={"x": 0.5, "y": 0.5}, method="ls", ls_draws="stratified", num_inference_steps=steps,
       guidance_scale=2.0, eta=1.0, height=16, width=16, output_type="latent",
       latents=torch.randn((B, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    per_row = torch.stack(routes)  # (steps run as mixed batches, 2B)
    assert per_row.shape[1] == 2 * B and torch.equal(per_row[:, :B], per_row[:, B:])
    assert per_row.shape[0] == steps  # every step mixed both adapters (seeded), so every step is seen
    assert ((per_row[:, :B] == 1).sum(0) == 2).all()
    with pytest.raises(ValueError, match="applies to method 'ls' only"):
        bp(prompt="p", weights={"x": 1.0}, ls_draws="golden", num_inference_steps=1, height=16, width=16)
