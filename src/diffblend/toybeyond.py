"""Beyond the paper, on the exact toy: stratified LS draws, Jensen-gap correctors, weight schedules.

Three measurements on the conflicting pair (``right``, ``corner``) of :func:`toybench.default_problem`,
every model exact (p_pre exp(r_i / alpha)), distances as energy distance / its Monte-Carlo floor
(ratio ~1: indistinguishable at this N; see :mod:`diffblend.toybench`):

* ``ls``: DB-MPA-LS with iid / stratified / golden draws vs DB-MPA at few steps (same cost):
  ED(LS, MPA) ratio, the spread over images of each image's share of steps on adapter 1, and the
  mean and spread of the reward r_right vs MPA's (stratified draws may move the mean by O(1/T)).
* ``corrector``: DB-MPA, + Langevin corrector steps, + SMC (score-only Feynman-Kac weight; and the
  exact closed-form weight as a reference) vs the exact target p_pre exp(r(w) / alpha), against
  model evaluations per output sample (NFE), over alpha and w.
* ``schedule``: w(t) schedules (:mod:`core.wschedule`) vs the constant w, including the toy-only
  least-squares oracle schedule (it needs the target's score: an upper bound for schedules).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .core import Blend, blend_denoisers, randn, sample, step_key
from .core.corrector import BlendSMC, LangevinCorrector
from .core.wschedule import ramp, scheduled_blend_denoisers
from .toybench import ToyProblem, default_problem, null_energy_distance, sliced_energy_distance
from ._io import atomic_write, atomic_write_text

__all__ = ["BeyondConfig", "run_beyond", "format_beyond", "plot_beyond", "write_beyond"]

PAIR = ("right", "corner")  # the conflicting pair


@dataclass
class BeyondConfig:
    """Settings of the beyond-the-paper measurements."""

    num_samples: int = 2000  # N output samples per row (and per exact reference set)
    seed: int = 0
    projections: int = 16  # directions of the sliced energy distance
    ls_steps: tuple[int, ...] = (5, 10, 20, 50)  # DDIM steps of the LS-draws table
    ls_repeats: int = 3  # seeds averaged per LS row (the ratios are noisy at ratio ~1-3)
    steps: int = 100  # DDIM steps of the corrector and schedule tables
    alphas: tuple[float, ...] = (0.25, 1.0, 4.0)  # KL weight of the aligned models
    ws: tuple[float, ...] = (0.25, 0.5, 0.75)  # w on ``right`` (1 - w on ``corner``)
    langevin_steps: tuple[int, ...] = (1, 3)  # corrector steps per denoising step
    langevin_step_size: float = 0.1  # delta / (1 - alpha_bar)
    particles: tuple[int, ...] = (4, 16)  # SMC particles per output sample
    exact_particles: int = 16  # SMC with the exact closed-form weight (a reference; 0: skip)
    ramp_deltas: tuple[float, ...] = (0.25, 0.5)  # w(t) ramps toward ``corner`` (and 0.25 toward ``right``)

    def __post_init__(self) -> None:
        if self.num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {self.num_samples}")
        if not 1 <= self.steps <= 1000 or not all(1 <= s <= 1000 for s in self.ls_steps):
            raise ValueError(f"steps and ls_steps must be in [1, 1000], got {self.steps}, {self.ls_steps}")
        if any(p < 1 for p in self.particles) or self.exact_particles < 0:
            raise ValueError(f"particles must be >= 1, got {self.particles}, {self.exact_particles}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class _Bench:
    """The problem at one alpha and w: exact models, target, reference samples and the distance."""

    def __init__(self, problem: ToyProblem, cfg: BeyondConfig, alpha: float, w: float):
        self.p, self.cfg, self.alpha, self.w = problem, cfg, alpha, w
        self.models = {n: problem.base.tilt(problem.rewards[n], alpha) for n in PAIR}
        self.den = {n: m.denoiser(problem.schedule) for n, m in self.models.items()}
        self.weights = {PAIR[0]: w, PAIR[1]: 1.0 - w}
        self.target = problem.base.target([problem.rewards[n] for n in PAIR], [w, 1 - w], alpha)
        self.ref = self.target.sample(cfg.num_samples, _gen(cfg.seed * 1000 + 2))
        self.floor = null_energy_distance(self.ref, cfg.num_samples, cfg.num_samples, cfg.projections)

    def ratio(self, x: torch.Tensor) -> float:
        return sliced_energy_distance(x, self.ref, self.cfg.projections) / self.floor

    def noise(self, n: int, seed: int):
        g = _gen(seed)
        return randn((n, 2), g, dtype=torch.float64), g

    def blend(self, **kw) -> Blend:
        return Blend.create(self.weights, list(PAIR), **kw)


# -- 1. stratified LS draws -----------------------------------------------------------------------

def _ls_run(b: _Bench, steps: int, draws: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, each sample's share of steps on adapter 1) of one LS run."""
    ts = b.p.schedule.timesteps(steps)
    blend = b.blend(method="ls", seed=seed, ls_draws=draws, timesteps=None if draws == "iid" else ts)
    x, g = b.noise(b.cfg.num_samples, seed * 7919 + 1)
    share = torch.zeros(b.cfg.num_samples, dtype=torch.float64)

    def count(i, t, out):
        share.add_(blend.choices(step_key(t), b.cfg.num_samples).eq(1).double() / steps)

    out = sample(blend_denoisers(b.den, blend), x, b.p.schedule, ts, generators=g, callback=count).sample
    return out, share


def ls_table(problem: ToyProblem, cfg: BeyondConfig) -> list[dict]:
    """LS draws vs MPA at few steps, alpha = 1, w = 1/2 (averaged over ``ls_repeats`` seeds)."""
    b, N, r = _Bench(problem, cfg, 1.0, 0.5), cfg.num_samples, problem.rewards[PAIR[0]]
    rows = []
    for steps in cfg.ls_steps:
        ts = problem.schedule.timesteps(steps)
        for draws in ("iid", "stratified", "golden"):
            acc: dict[str, list[float]] = {}
            for k in range(cfg.ls_repeats):
                seed = cfg.seed * 100 + k
                x, g = b.noise(N, seed * 7919 + 2)
                mpa = sample(blend_denoisers(b.den, b.blend()), x, problem.schedule, ts, generators=g).sample
                out, share = _ls_run(b, steps, draws, seed)
                pooled = null_energy_distance(torch.cat([out, mpa]), N, N, cfg.projections)
                rm, rl = r(mpa), r(out)
                se = math.sqrt(float(rm.var() + rl.var()) / N)
                for key, v in (("ls_vs_mpa", sliced_energy_distance(out, mpa, cfg.projections) / pooled),
                               ("share_std", float(share.std())), ("reward_shift_se", float(rl.mean() - rm.mean()) / se),
                               ("reward_std_ratio", float(rl.std() / rm.std()))):
                    acc.setdefault(key, []).append(v)
            rows.append({"steps": steps, "draws": draws, **{k: sum(v) / len(v) for k, v in acc.items()},
                         "iid_share_std": math.sqrt(0.25 / steps)})
    return rows


# -- 2. correctors --------------------------------------------------------------------------------

def _corrector_rows(b: _Bench) -> list[dict]:
    cfg, sched = b.cfg, b.p.schedule
    ts, N, m = sched.timesteps(cfg.steps), cfg.num_samples, 2
    mpa = blend_denoisers(b.den, b.blend())
    rows = []

    def add(method: str, knob: int, out: torch.Tensor, nfe: float, **extra):
        rows.append({"alpha": b.alpha, "w": b.w, "method": method, "knob": knob, "nfe": nfe,
                     "ratio": b.ratio(out), **extra})

    x, g = b.noise(N, cfg.seed * 1000 + 5)
    add("mpa", 0, sample(mpa, x, sched, ts, generators=g).sample, m * cfg.steps)
    for n in cfg.langevin_steps:
        x, g = b.noise(N, cfg.seed * 1000 + 5)
        lc = LangevinCorrector(mpa, sched, ts, n, cfg.langevin_step_size, generators=g)
        out = sample(mpa, x, sched, ts, generators=g, callback=lc).sample
        add("langevin", n, out, m * (cfg.steps + lc.calls))  # lc.calls: corrector calls of the batch
    exact = {n: (lambda mix: lambda xx, t: mix.noised(float(sched.alpha_bar(t))).log_prob(xx))(mm)
             for n, mm in b.models.items()}
    runs = [("smc", P, None) for P in cfg.particles]
    if cfg.exact_particles:
        runs.append(("smc_exact", cfg.exact_particles, exact))
    for name, P, dens in runs:
        x, _ = b.noise(N, cfg.seed * 1000 + 5)
        smc = BlendSMC(b.den, b.blend(), sched, ts, P, generator=_gen(cfg.seed * 1000 + 6), log_density=dens)
        out = smc.run(x, generators=_gen(cfg.seed * 1000 + 7))
        add(name, P, out, m * cfg.steps * P, resamples_per_group=smc.resamples / N)
    return rows


def corrector_table(problem: ToyProblem, cfg: BeyondConfig) -> list[dict]:
    return [r for a in cfg.alphas for w in cfg.ws for r in _corrector_rows(_Bench(problem, cfg, a, w))]


# -- 3. weight schedules --------------------------------------------------------------------------

def oracle_schedule(b: _Bench, timesteps: torch.Tensor, points: int = 2000) -> dict[int, list[float]]:
    """Toy-only: at each t, the w(t) minimising E|w s_1 + (1 - w) s_2 - s_target|^2 under the noised
    target (scores of the noised aligned models and target; closed form, then clipped to [0, 1])."""
    out = {}
    for t in timesteps.tolist():
        a = float(b.p.schedule.alpha_bar(torch.tensor(t)))
        x = b.target.noised(a).sample(points, _gen(b.cfg.seed * 1000 + 9))
        s1, s2 = (b.models[n].noised(a).score(x) for n in PAIR)
        d = s1 - s2
        w1 = float((d * (b.target.noised(a).score(x) - s2)).sum() / (d * d).sum().clamp(min=1e-300))
        w1 = min(max(w1, 0.0), 1.0)
        out[t] = [w1, 1.0 - w1]
    return out


def schedule_table(problem: ToyProblem, cfg: BeyondConfig) -> list[dict]:
    """Constant w vs ramps vs the oracle schedule, over alpha and w (DB-MPA, ``steps`` steps)."""
    sched, rows = problem.schedule, []
    ts = sched.timesteps(cfg.steps)
    for alpha in cfg.alphas:
        for w in cfg.ws:
            b = _Bench(problem, cfg, alpha, w)
            orc = oracle_schedule(b, ts)
            kinds = [("constant", lambda t, w=w: [w, 1 - w])]
            kinds += [(f"ramp corner {d:g}", ramp([w, 1 - w], 1, d, sched)) for d in cfg.ramp_deltas]
            kinds += [("ramp right 0.25", ramp([w, 1 - w], 0, 0.25, sched)), ("oracle (toy only)", orc.__getitem__)]
            for name, fn in kinds:
                x, g = b.noise(cfg.num_samples, cfg.seed * 1000 + 5)
                den = scheduled_blend_denoisers(b.den, PAIR, fn)
                rows.append({"alpha": alpha, "w": w, "schedule": name,
                             "ratio": b.ratio(sample(den, x, sched, ts, generators=g).sample)})
    return rows


# -- the run and its outputs ----------------------------------------------------------------------

def run_beyond(cfg: BeyondConfig | None = None, problem: ToyProblem | None = None) -> dict:
    cfg, problem = cfg or BeyondConfig(), problem or default_problem()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"config": asdict(cfg), "ls": ls_table(problem, cfg)}
    out["corrector"] = corrector_table(problem, cfg)
    out["schedule"] = schedule_table(problem, cfg)
    out["wall_time_s"] = time.perf_counter() - t0
    return out


def format_beyond(result: dict) -> str:
    """The three tables as text."""
    lines = ["LS draws vs DB-MPA (alpha = 1, w = 1/2, conflicting pair; same cost: 1 model per step)",
             f"{'steps':>5} {'draws':>10} {'ED(LS,MPA)/floor':>16} {'share std':>9} {'(iid theory)':>12} "
             f"{'dE[r] / SE':>10} {'std r / MPA':>11}"]
    for r in result["ls"]:
        lines.append(f"{r['steps']:>5} {r['draws']:>10} {r['ls_vs_mpa']:>16.1f} {r['share_std']:>9.3f} "
                     f"{r['iid_share_std']:>12.3f} {r['reward_shift_se']:>+10.2f} {r['reward_std_ratio']:>11.3f}")
    lines += ["", "Jensen-gap correctors: ED to the exact target / floor, by NFE per output sample",
              f"{'alpha':>5} {'w':>5} " + " ".join(f"{_label(r):>13}" for r in _first_block(result["corrector"]))]
    for key in _blocks(result["corrector"]):
        rs = [r for r in result["corrector"] if (r["alpha"], r["w"]) == key]
        lines.append(f"{key[0]:>5g} {key[1]:>5g} " + " ".join(f"{r['ratio']:>13.1f}" for r in rs))
    lines.append(f"{'NFE':>11} " + " ".join(f"{r['nfe']:>13.0f}" for r in _first_block(result["corrector"])))
    names = list(dict.fromkeys(r["schedule"] for r in result["schedule"]))
    lines += ["", "Weight schedules w(t) (DB-MPA): ED to the exact target / floor",
              f"{'alpha':>5} {'w':>5} " + " ".join(f"{n:>17}" for n in names)]
    for key in _blocks(result["schedule"]):
        rs = {r["schedule"]: r["ratio"] for r in result["schedule"] if (r["alpha"], r["w"]) == key}
        lines.append(f"{key[0]:>5g} {key[1]:>5g} " + " ".join(f"{rs[n]:>17.1f}" for n in names))
    lines.append(f"\nwall time {result['wall_time_s']:.1f} s")
    return "\n".join(lines)


def _label(r: dict) -> str:
    return {"mpa": "MPA", "langevin": f"Langevin x{r['knob']}", "smc": f"SMC P={r['knob']}",
            "smc_exact": f"SMCexact P={r['knob']}"}[r["method"]]


def _blocks(rows: list[dict]) -> list[tuple[float, float]]:
    return list(dict.fromkeys((r["alpha"], r["w"]) for r in rows))


def _first_block(rows: list[dict]) -> list[dict]:
    key = _blocks(rows)[0]
    return [r for r in rows if (r["alpha"], r["w"]) == key]


def plot_beyond(result: dict, path: str) -> None:
    """Distance to the target vs NFE (one panel per alpha, mean over w), and LS vs MPA vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(dict.fromkeys(r["alpha"] for r in result["corrector"]))
    fig, axes = plt.subplots(1, len(alphas) + 1, figsize=(4.2 * (len(alphas) + 1), 3.6))
    for ax, alpha in zip(axes, alphas):
        rows = [r for r in result["corrector"] if r["alpha"] == alpha]
        for i, method in enumerate(("langevin", "smc", "smc_exact")):
            pts = sorted({(r["nfe"], r["knob"]) for r in rows if r["method"] in (method, "mpa")})
            ys = [_mean([r["ratio"] for r in rows if r["nfe"] == nfe and r["method"] in (method, "mpa")
                         and (r["method"] == "mpa" or r["knob"] == k)]) for nfe, k in pts]
            ax.plot([p[0] for p in pts], ys, marker="os^"[i], label=method.replace("_", " "), color=f"C{i}")
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="NFE per sample", title=f"alpha = {alpha:g} (mean over w)")
        ax.set_ylabel("ED to exact target / MC floor")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for i, draws in enumerate(("iid", "stratified", "golden")):
        rows = [r for r in result["ls"] if r["draws"] == draws]
        ax.plot([r["steps"] for r in rows], [r["ls_vs_mpa"] for r in rows], marker="o", label=draws, color=f"C{i}")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="DDIM steps", ylabel="ED(LS, MPA) / MC floor",
           title="DB-MPA-LS draws (alpha = 1, w = 1/2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def write_beyond(result: dict, output_dir: str) -> dict[str, str]:
    """Write ``beyond.json`` (the record) then ``beyond.png`` (from the record)."""
    import json
    import os

    paths = {"json": os.path.join(output_dir, "beyond.json"), "png": os.path.join(output_dir, "beyond.png")}
    atomic_write_text(paths["json"], json.dumps(result, indent=1))
    plot_beyond(result, paths["png"])
    return paths
