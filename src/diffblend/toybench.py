"""``diffblend toy``: Diffusion Blend on an exact 2-D Gaussian-mixture diffusion.

Every "fine-tuned model" here is exact: the model aligned to (r_i, alpha) is the closed-form mixture
p_pre exp(r_i / alpha) (:mod:`diffblend.core.toy`), and so is the target of every blend,
p_pre exp(lambda r(w) / alpha). The benchmark blends the exact eps of the aligned models with
:func:`core.blend_denoisers`, samples with :func:`core.sample` (DDIM), and measures against the
exact target of each setting:

* expected rewards, sampled vs exact;
* the energy distance to exact target samples (computed by projections, exact up to a fine
  quadrature), next to its Monte-Carlo noise floor (exact target vs exact target, same sample
  sizes): a ratio near 1 means "indistinguishable at this N";
* DB-MPA-LS vs DB-MPA (Prop. 2 says they agree at eta = 1), and the same at eta = 0;
* the Jensen gap |u - u_bar| of Lemma 1 as a function of t, and the MPA drift error it causes.

Rows whose blend is a single exact model (w one-hot at lambda = 1, or lambda = 0) measure the
sampler's own discretisation error, the yardstick for every other row.

The run writes its records first (JSON), then the figure from the records (PNG).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .core import BASE, Blend, NoiseSchedule, blend_denoisers, randn, sample
from .core.toy import GaussianMixture, QuadraticReward, control, jensen_control
from ._io import atomic_write, atomic_write_text

__all__ = ["ToyConfig", "ToyProblem", "default_problem", "energy_distance", "sliced_energy_distance", "null_energy_distance", "jensen_table", "run_toybench",
           "format_table", "plot_toybench", "write_outputs"]


@dataclass
class ToyConfig:
    """Settings of one benchmark run."""

    num_samples: int = 4000  # N, samples per setting and method (and per exact reference set)
    steps: int = 200  # DDIM steps over the 1000-step linear schedule (bias in E[r] <~ 0.02 at 200)
    seed: int = 0  # all noise derives from it; the same noise is reused for every setting (paired)
    alpha: float = 1.0  # KL weight the per-reward models are aligned at
    w_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight on the first reward (rest on the second)
    lambda_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)  # KL strength lambda of DB-KLA
    alpha_sweep: tuple[float, ...] = (0.25, 4.0)  # extra DB-MPA rows at w = 1/2 with these alphas
    floor_repeats: int = 4  # measured exact-vs-exact replicates, recorded next to the expected floor
    projections: int = 16  # directions of the sliced energy distance (quadrature error ~0.5%)
    jensen_timesteps: tuple[int, ...] = (0, 20, 50, 100, 200, 400, 600, 800, 999)
    jensen_alpha_factors: tuple[float, ...] = (1.0, 0.25)  # Jensen gap at alpha * factor
    jensen_points: int = 1000  # x_t points per Jensen-gap estimate
    figure_points: int = 400  # samples per figure panel kept in the record

    def __post_init__(self) -> None:
        if self.num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {self.num_samples}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in [1, 1000], got {self.steps}")
        if not all(math.isfinite(a) and a > 0 for a in (self.alpha, *self.alpha_sweep)):
            raise ValueError(f"alpha and alpha_sweep must be finite numbers > 0, got {self.alpha}, {self.alpha_sweep}")
        if any(not 0 <= w <= 1 for w in self.w_grid):
            raise ValueError(f"w_grid values must be in [0, 1], got {self.w_grid}")
        if any(not 0 <= lam <= 2 for lam in self.lambda_grid):
            raise ValueError(f"lambda_grid values must be in [0, 2], got {self.lambda_grid}")
        if self.floor_repeats < 1:
            raise ValueError(f"floor_repeats must be >= 1, got {self.floor_repeats}")


@dataclass(frozen=True)
class ToyProblem:
    """A base mixture, named rewards and the schedule, all exact."""

    base: GaussianMixture
    rewards: dict[str, QuadraticReward]
    schedule: NoiseSchedule = field(default_factory=lambda: NoiseSchedule.linear(1000))

    def describe(self) -> dict:
        return {
            "base": {"weights": self.base.weights.tolist(), "means": self.base.means.tolist(),
                     "covs": self.base.covs.tolist()},
            "rewards": {n: {"Q": r.Q.tolist(), "b": r.b.tolist(), "c0": r.c0} for n, r in self.rewards.items()},
            "schedule": "linear betas 1e-4..0.02, 1000 steps",
        }

    @classmethod
    def from_description(cls, d: dict) -> ToyProblem:
        base = GaussianMixture.create(**d["base"])
        rewards = {n: QuadraticReward(torch.tensor(r["Q"], dtype=torch.float64),
                                      torch.tensor(r["b"], dtype=torch.float64), r["c0"])
                   for n, r in d["rewards"].items()}
        return cls(base, rewards)


def default_problem() -> ToyProblem:
    """Three modes; ``right`` (linear, r = x) conflicts with ``corner`` (a bump at the top left),
    and ``up`` (linear, r = y) is a third, partly aligned preference."""
    base = GaussianMixture.create(
        weights=[0.4, 0.4, 0.2],
        means=[[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]],
        covs=[[[0.35, 0.15], [0.15, 0.30]], [[0.30, -0.10], [-0.10, 0.40]], [[0.50, 0.0], [0.0, 0.25]]],
    )
    rewards = {
        "right": QuadraticReward.linear([1.0, 0.0]),
        "corner": QuadraticReward.quadratic(0.5, [-2.5, 2.0]),
        "up": QuadraticReward.linear([0.0, 1.0]),
    }
    return ToyProblem(base, rewards)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic, >= 0), x (n, d), y (m, d).

    Its value for two independent samples of one distribution is about (1/n + 1/m) E|X - X'|.
    O(n m) time and memory; :func:`sliced_energy_distance` gives the same value in O(n log n).
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_energy_distance(x: torch.Tensor, y: torch.Tensor, projections: int = 16) -> float:
    """The energy distance of :func:`energy_distance`, computed from 1-D projections in O(n log n).

    Two identities make it exact: the 1-D energy distance of two empirical distributions is
    2 int (F_x - F_y)^2 dz (V-statistics), a sum over the merged sorted sample; and
    E_theta |theta . v| = c_d |v| for theta uniform on the sphere, c_d = Gamma(d/2) / (sqrt(pi)
    Gamma((d+1)/2)) (2 / pi in 2-D), so the mean 1-D distance over directions, divided by c_d, is
    the d-dimensional one. Directions: ``projections`` evenly spaced angles in 2-D (a quadrature
    of a periodic integrand; on the toy's samples 16 angles are within 0.5% of the exact value,
    far below the Monte-Carlo noise), a seeded uniform draw otherwise (then it is an estimate).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have shapes (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    z = torch.cat([x.to(torch.float64), y.to(torch.float64)]) @ _directions(d, projections).T  # (n + m, L)
    z, order = z.sort(0)
    jump = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).to(torch.float64)
    cdf_gap = jump[order].cumsum(0)[:-1]  # F_x - F_y on each gap between merged points
    one_d = 2 * (cdf_gap**2 * z.diff(dim=0)).sum(0)  # (L,)
    return float(one_d.mean() / _c_d(d))


def _directions(d: int, projections: int) -> torch.Tensor:
    """(L, d) unit directions: evenly spaced angles in 2-D, a seeded uniform draw otherwise."""
    if d == 2:
        ang = torch.arange(projections, dtype=torch.float64) * (math.pi / projections)
        return torch.stack([ang.cos(), ang.sin()], 1)
    theta = torch.randn(projections, d, generator=_gen(0), dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def _c_d(d: int) -> float:
    """E_theta |theta . v| / |v| for theta uniform on the unit sphere of R^d (2 / pi in 2-D)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def null_energy_distance(x: torch.Tensor, n: int, m: int, projections: int = 16) -> float:
    """The expected energy distance between independent samples of sizes n and m of the
    distribution that x (k, d) samples: (1/n + 1/m) E|X - X'| (V-statistics), with E|X - X'|
    estimated from x (U-statistic, through sorted projections as in :func:`sliced_energy_distance`).

    This is the mean of the exact-vs-exact noise floor, without replicates' chi-square noise.
    """
    k, d = x.shape
    z = (x.to(torch.float64) @ _directions(d, projections).T).sort(0).values  # (k, L)
    rank = torch.arange(1, k + 1, dtype=torch.float64)[:, None]
    pair_sum = ((2 * rank - k - 1) * z).sum(0)  # sum over i < j of |z_i - z_j|, per direction
    mean_pair = float((pair_sum / (k * (k - 1) / 2)).mean()) / _c_d(d)
    return (1.0 / n + 1.0 / m) * mean_pair


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _label(w: dict[str, float], lam: float) -> str:
    """What a row tests: "base" / "exact" (one exact model: the sampler's own error), "MPA",
    "KLA" (one reward, lambda != 1) or "MPA+KLA"."""
    if lam == 0:
        return "base"
    single = len([v for v in w.values() if v > 0]) == 1
    if lam == 1:
        return "exact" if single else "MPA"
    return "KLA" if single else "MPA+KLA"


def _settings(cfg: ToyConfig, names: list[str]) -> list[dict]:
    """(weights, lambda, method, eta, alpha) of every row, in table order."""
    a, b = names[0], names[1]
    row = dict(method="mpa", eta=1.0, alpha=cfg.alpha, kl_strength=1.0)
    out = []
    for lam in cfg.lambda_grid:
        for w in cfg.w_grid if lam > 0 else cfg.w_grid[:1]:  # lambda = 0 is the base for every w
            for method in ("mpa", "ls") if lam <= 1 else ("mpa",):  # LS needs lambda <= 1 (Prop. 2)
                out.append({**row, "weights": {a: w, b: 1.0 - w}, "kl_strength": lam, "method": method})
    half = {a: 0.5, b: 0.5}
    for method in ("mpa", "ls"):
        out.append({**row, "weights": {n: 1.0 / len(names) for n in names}, "method": method})
    for method in ("mpa", "ls"):  # Prop. 2 needs the sampler's noise: eta = 0 is outside it
        out.append({**row, "weights": half, "method": method, "eta": 0.0})
    for alpha in cfg.alpha_sweep:  # the Jensen gap grows as alpha shrinks (Lemma 1)
        out.append({**row, "weights": half, "alpha": alpha})
    return out


def _run_setting(problem: ToyProblem, cfg: ToyConfig, s: dict, mpa_samples: dict) -> tuple[dict, torch.Tensor]:
    """Sample one setting with core.blend_denoisers + core.sample and measure it against its exact
    target; returns (record row, samples (N, d)). ``mpa_samples`` pairs each LS row with its MPA row."""
    names = list(problem.rewards)
    weights = {n: s["weights"].get(n, 0.0) for n in names}
    lam, alpha, N = s["kl_strength"], s["alpha"], cfg.num_samples
    blend = Blend.create(weights, names, kl_strength=lam, method=s["method"], seed=cfg.seed)
    sched = problem.schedule
    denoisers = {BASE: problem.base.denoiser(sched)}
    for n in blend.names:  # the exact "fine-tuned" model of each reward, at this alpha
        if blend.weights[blend.names.index(n)] > 0:
            denoisers[n] = problem.base.tilt(problem.rewards[n], alpha).denoiser(sched)
    # MPA and LS use different noise, so their samples are independent and ED(LS, MPA) has the
    # usual null floor; every setting of one method reuses its noise (paired across w and lambda).
    gen = _gen(cfg.seed * 1000 + (1 if s["method"] == "ls" else 0))
    x = randn((N, problem.base.dim), gen, dtype=torch.float64)
    ts = sched.timesteps(cfg.steps)
    out = sample(blend_denoisers(denoisers, blend), x, sched, ts, eta=s["eta"], generators=gen).sample

    target = problem.base.target(list(problem.rewards.values()), list(weights.values()), alpha, lam)
    ref = target.sample(N, _gen(cfg.seed * 1000 + 2))
    dist = lambda u, v: sliced_energy_distance(u, v, cfg.projections)  # noqa: E731
    measured = [dist(target.sample(N, _gen(cfg.seed * 1000 + 10 + k)), ref) for k in range(cfg.floor_repeats)]
    row: dict[str, Any] = {
        "method": s["method"], "kind": _label(weights, lam), "weights": weights, "kl_strength": lam,
        "eta": s["eta"], "alpha": alpha, "distance": dist(out, ref),
        # expected exact-vs-exact distance (the floor's mean, noise-free), and measured replicates
        "floor": null_energy_distance(ref, N, N, cfg.projections),
        "floor_measured_mean": sum(measured) / len(measured), "floor_measured_max": max(measured),
        "rewards": {},
    }
    row["ratio"] = row["distance"] / row["floor"]
    for n, r in problem.rewards.items():
        vals = r(out)
        row["rewards"][n] = {"sampled": float(vals.mean()), "exact": target.expect(r),
                             "stderr": float(vals.std() / math.sqrt(N))}
    key = (tuple(weights.values()), lam, s["eta"], alpha)
    if s["method"] == "mpa":
        mpa_samples[key] = out
    elif key in mpa_samples:
        row["ls_vs_mpa"] = dist(out, mpa_samples[key])
        # the null here is "LS and MPA sample one distribution": its floor from the pooled samples
        row["ls_vs_mpa_floor"] = null_energy_distance(torch.cat([out, mpa_samples[key]]), N, N, cfg.projections)
        row["ls_vs_mpa_ratio"] = row["ls_vs_mpa"] / row["ls_vs_mpa_floor"]
    return row, out


# -- Jensen gap --------------------------------------------------------------------------------------

def jensen_table(problem: ToyProblem, cfg: ToyConfig) -> list[dict]:
    """Mean |u - u_bar| (Lemma 1) per reward, and the MPA drift error |sum_i w_i u_i - u(r(w))| at
    w = (1/2, 1/2) on the first two rewards, over x_t from the exact aligned / target marginal.

    Values are in score units; the matching error in eps is sqrt(1 - alpha_bar_t) times these.
    """
    names = list(problem.rewards)
    half = QuadraticReward.weighted_sum([problem.rewards[names[0]], problem.rewards[names[1]]], [0.5, 0.5])
    rows = []
    for factor in cfg.jensen_alpha_factors:
        alpha = cfg.alpha * factor
        for t in cfg.jensen_timesteps:
            a = float(problem.schedule.alpha_bar(t))
            row: dict[str, Any] = {"alpha": alpha, "t": int(t), "alpha_bar": a, "gap": {}}
            for i, (n, r) in enumerate(problem.rewards.items()):
                x_t = problem.base.tilt(r, alpha).noised(a).sample(cfg.jensen_points, _gen(cfg.seed * 1000 + 100 + i))
                u = control(problem.base, r, alpha, x_t, a)
                u_bar = jensen_control(problem.base, r, alpha, x_t, a)
                row["gap"][n] = float((u - u_bar).norm(dim=1).mean())
                row.setdefault("control", {})[n] = float(u.norm(dim=1).mean())
            x_t = problem.base.tilt(half, alpha).noised(a).sample(cfg.jensen_points, _gen(cfg.seed * 1000 + 99))
            u_mix = 0.5 * (control(problem.base, problem.rewards[names[0]], alpha, x_t, a)
                           + control(problem.base, problem.rewards[names[1]], alpha, x_t, a))
            row["mpa_drift_error"] = float((u_mix - control(problem.base, half, alpha, x_t, a)).norm(dim=1).mean())
            rows.append(row)
    return rows


# -- the whole run -----------------------------------------------------------------------------------

def run_toybench(cfg: ToyConfig | None = None, problem: ToyProblem | None = None, progress: bool = True) -> dict:
    """Run every setting and the Jensen-gap table; returns the JSON-ready record."""
    from tqdm.auto import tqdm

    cfg = cfg or ToyConfig()
    problem = problem or default_problem()
    if len(problem.rewards) < 2:
        raise ValueError("the toy problem needs at least two rewards")
    t0 = time.perf_counter()
    settings = _settings(cfg, list(problem.rewards))
    rows, figure, mpa_samples = [], {}, {}
    fig_w = sorted({cfg.w_grid[0], cfg.w_grid[len(cfg.w_grid) // 2], cfg.w_grid[-1]})
    fig_lam = sorted({lam for lam in cfg.lambda_grid if lam > 0} & {0.5, 1.0, 2.0}) or [1.0]
    for s in tqdm(settings, desc="diffblend toy", disable=not progress):
        row, out = _run_setting(problem, cfg, s, mpa_samples)
        rows.append(row)
        w0 = list(row["weights"].values())[0]
        if s["method"] == "mpa" and s["eta"] == 1.0 and s["alpha"] == cfg.alpha and w0 in fig_w and row["kl_strength"] in fig_lam \
                and len([v for v in row["weights"].values() if v > 0]) <= 2:
            figure[f"w={w0:g},lambda={row['kl_strength']:g}"] = out[: cfg.figure_points].tolist()
    jensen = jensen_table(problem, cfg)
    return {
        "config": asdict(cfg),
        "problem": problem.describe(),
        "rows": rows,
        "jensen": jensen,
        "figure_samples": figure,
        "wall_time_s": time.perf_counter() - t0,
    }


# -- reporting -------------------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """The printed summary: one line per setting, then the Jensen-gap table."""
    names = list(result["problem"]["rewards"])
    head = (f"{'method':6} {'kind':7} {'w':>14} {'lam':>4} {'eta':>3} {'alpha':>5} "
            + " ".join(f"{'E[' + n + '] samp/exact':>21}" for n in names)
            + f" {'ED x1e3':>8} {'floor':>6} {'ratio':>6} {'LS-MPA':>7}")
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        w = ",".join(f"{v:.2f}" for v in row["weights"].values())
        rew = " ".join(f"{row['rewards'][n]['sampled']:>+10.3f}/{row['rewards'][n]['exact']:<+10.3f}".rjust(21)
                       for n in names)
        ls = f"{row['ls_vs_mpa_ratio']:>7.2f}" if "ls_vs_mpa_ratio" in row else f"{'':>7}"
        lines.append(f"{row['method']:6} {row['kind']:7} {w:>14} {row['kl_strength']:>4.2g} {row['eta']:>3.0f} "
                     f"{row['alpha']:>5.3g} {rew} {1e3 * row['distance']:>8.2f} {1e3 * row['floor']:>6.2f} "
                     f"{row['ratio']:>6.1f} {ls}")
    lines.append("")
    lines.append("ED: energy distance to exact target samples; floor: its expected value between two exact "
                 "samples of the same N (Monte-Carlo noise);\nratio = ED / floor (under the null: mean 1, "
                 "99% quantile 2.7-4.3 measured on this toy); LS-MPA: the same ratio for ED(LS, MPA) (floor from their pooled samples). "
                 "kind 'base'/'exact': one exact model, i.e. the sampler's own error.")
    lines.append("")
    lines.append("Jensen gap E|u - u_bar| (Lemma 1, score units) per reward, and MPA drift error "
                 f"|mean_i u_i - u(r(w))| at w = 1/2 on {names[0]}, {names[1]}")
    jh = f"{'alpha':>6} {'t':>4} {'abar':>7} " + " ".join(f"{n:>9}" for n in names) + f" {'MPA err':>9}"
    lines += [jh, "-" * len(jh)]
    for j in result["jensen"]:
        lines.append(f"{j['alpha']:>6.3g} {j['t']:>4d} {j['alpha_bar']:>7.4f} "
                     + " ".join(f"{j['gap'][n]:>9.4f}" for n in names) + f" {j['mpa_drift_error']:>9.4f}")
    lines.append(f"\nwall time {result['wall_time_s']:.1f} s")
    return "\n".join(lines)


def plot_toybench(result: dict, path: str) -> None:
    """Samples over exact target densities (one panel per recorded setting) and the Jensen gap vs t.

    Plots from the record only (the problem is rebuilt from its description). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = ToyProblem.from_description(result["problem"])
    cfg = result["config"]
    panels = result["figure_samples"]
    keys = sorted(panels, key=lambda k: (float(k.split("lambda=")[1]), float(k.split(",")[0][2:])))
    lams = sorted({float(k.split("lambda=")[1]) for k in keys})
    ws = sorted({float(k.split(",")[0][2:]) for k in keys})
    fig = plt.figure(figsize=(3.2 * len(ws) + 4.5, 3.0 * max(len(lams), 1)))
    grid = fig.add_gridspec(max(len(lams), 1), len(ws) + 1, width_ratios=[1] * len(ws) + [1.4])
    names = list(problem.rewards)
    xs = torch.linspace(-4.5, 4.5, 120, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    for key in keys:
        lam, w = float(key.split("lambda=")[1]), float(key.split(",")[0][2:])
        ax = fig.add_subplot(grid[lams.index(lam), ws.index(w)])
        target = problem.base.target(list(problem.rewards.values()),
                                     [w, 1 - w] + [0.0] * (len(names) - 2), cfg["alpha"], lam)
        dens = target.log_prob(pts).exp().reshape(gx.shape)
        ax.contourf(gx, gy, dens, levels=12, cmap="Blues")
        s = torch.tensor(panels[key])
        ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.set_title(f"w({names[0]})={w:g}, lambda={lam:g}", fontsize=9)
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[:, -1])
    for factor_alpha in sorted({j["alpha"] for j in result["jensen"]}, reverse=True):
        js = [j for j in result["jensen"] if j["alpha"] == factor_alpha]
        for i, n in enumerate(names):  # one colour per reward, one line style per alpha
            ax.plot([j["t"] for j in js], [j["gap"][n] for j in js], marker="o", ms=3, color=f"C{i}",
                    label=f"{n}, alpha={factor_alpha:g}", linestyle="-" if factor_alpha == cfg["alpha"] else "--")
    ax.set_xlabel("t")
    ax.set_ylabel("E|u - u_bar|")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title("Jensen gap (Lemma 1)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle("DB-MPA / DB-KLA samples (red) over exact target densities (blue)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def write_outputs(result: dict, output_dir: str) -> dict[str, str]:
    """Write ``toy.json`` (the record) then ``toy.png`` (from the record); returns their paths."""
    paths = {"json": os.path.join(output_dir, "toy.json"), "png": os.path.join(output_dir, "toy.png")}
    atomic_write_text(paths["json"], json.dumps(result, indent=1))
    plot_toybench(result, paths["png"])
    return paths
