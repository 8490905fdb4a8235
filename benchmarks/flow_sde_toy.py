"""The flow-matching SDE sampler on the exact Gaussian-mixture toy (docs/flow_sde.md's tables).

    python benchmarks/flow_sde_toy.py                       # N = 20000, steps 10,25,50,100,200
    python benchmarks/flow_sde_toy.py --n 4000 --steps 25,100 --shift 3

Table 1: the base model's exact velocity sampled by core.sample_flow at each noise_level vs exact
samples of the mixture: energy distance / its Monte-Carlo floor (about 1 when indistinguishable,
null 99% quantile ~4), and the largest |mean error| in standard errors.
Table 2: DB-MPA-LS vs DB-MPA with two aligned flow models (the base tilted by the conflicting
rewards "right" and "corner", w = 1/2): energy distance / pooled floor, and LS's excess variance
per coordinate (Var_LS - Var_MPA). All noise comes from fixed seeds.
"""

from __future__ import annotations

import argparse
import math

import torch

from diffblend.core import BASE, Blend, blend_denoisers, flow_sigmas, randn, sample_flow
from diffblend.toybench import default_problem, null_energy_distance, sliced_energy_distance

F64 = torch.float64
LEVELS = (0.0, 0.3, 0.7, 1.0)


def _run(denoiser, n, noise_level, steps, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn((n, 2), gen, dtype=F64)
    return sample_flow(denoiser, x, flow_sigmas(steps, shift), noise_level=noise_level, generators=gen).sample


def _ratio(x, y):
    return sliced_energy_distance(x, y, 64) / null_energy_distance(torch.cat([x, y]), len(x), len(y), 64)


def sampler_table(n: int, steps: list[int], shift: float) -> None:
    g = default_problem().base
    ref = g.sample(n, torch.Generator().manual_seed(9))
    print(f"\nbase sampled vs exact (N = {n}, shift = {shift}): ED / floor, max |mean error| / SE")
    print("noise_level | " + " | ".join(f"{s} steps" for s in steps))
    for a in LEVELS:
        cells = []
        for s in steps:
            out = _run(g.flow_denoiser(), n, a, s, shift, seed=8)
            se = out.std(0) / math.sqrt(n)
            cells.append(f"{_ratio(out, ref):.2f}, {float(((out.mean(0) - g.mean()).abs() / se).max()):.1f}")
        print(f"{a} | " + " | ".join(cells))


def ls_table(n: int, steps: list[int], shift: float) -> None:
    p = default_problem()
    names = list(p.rewards)
    den = {BASE: p.base.flow_denoiser(), **{k: p.base.tilt(r, 1.0).flow_denoiser() for k, r in p.rewards.items()}}

    def run(method, a, s, seed):
        blend = Blend.create({"right": 0.5, "corner": 0.5}, names, method=method, seed=seed)
        return _run(blend_denoisers(den, blend), n, a, s, shift, seed)

    print(f"\nLS vs MPA (N = {n}, shift = {shift}): ED / floor, Var_LS - Var_MPA (x, y)")
    print("noise_level | " + " | ".join(f"{s} steps" for s in steps))
    for a in LEVELS:
        cells = []
        for s in steps:
            mpa, ls = run("mpa", a, s, 10), run("ls", a, s, 11)
            dv = (ls.var(0) - mpa.var(0)).tolist()
            cells.append(f"{_ratio(ls, mpa):.1f}, ({dv[0]:+.3f}, {dv[1]:+.3f})")
        print(f"{a} | " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="samples per run")
    ap.add_argument("--steps", default="10,25,50,100,200", help="comma-separated step counts")
    ap.add_argument("--shift", type=float, default=1.0, help="sigma shift of the grid (SD3: 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in args.steps.split(",")]
    sampler_table(args.n, steps, args.shift)
    ls_table(args.n, steps, args.shift)


if __name__ == "__main__":
    main()
