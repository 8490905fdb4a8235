"""Controlled decoding (CoDe, Singh et al. 2024), the search baseline of the paper.

Blockwise best-of-N: the N candidates of a sample start a block of B steps from the same state,
each runs B stochastic DDIM steps with its own noise, and the candidate whose Tweedie estimate
x0_hat at the end of the block has the highest weighted reward sum_i w_i r_i is kept. Scoring a
candidate needs one model evaluation at its end state (x0_hat is a model prediction); that
prediction is reused as the first step of the next block, so it is not paid twice. The first step
of a block is shared by all candidates (same state), so it costs one evaluation, not N. The last
block scores the final samples themselves (no model evaluation).

Noise: candidate n of sample b draws its noise from sample b's generator, candidates in order
0..N-1 at every step. So N = 1 consumes exactly the noise of plain sampling and equals it, and
every setting of a sweep that shares the per-sample generators shares candidate 0's path.

Cost per sample (S steps, blocks of B): about N * S denoiser evaluations, counted exactly in
``nfe``; the reward forward passes are counted in ``reward_evals``. The paper uses N = 20, B = 5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._fields import setting
from ..core.sampling import Denoiser, NoiseSchedule, ddim_step
from ._common import ScoreFn, identity, repeat_cond

__all__ = ["CoDeConfig", "CoDeOutput", "code_sample"]


@dataclass(frozen=True)
class CoDeConfig:
    """Settings of controlled decoding."""

    num_candidates: int = setting(20, "N, candidates per sample per block (paper: 20)")
    block_size: int = setting(5, "B, denoising steps per block (paper: 5)")
    eta: float = setting(1.0, "DDIM eta; candidates differ only through the step noise, so eta > 0")

    def __post_init__(self) -> None:
        if int(self.num_candidates) != self.num_candidates or self.num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {self.num_candidates}")
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


@dataclass
class CoDeOutput:
    """sample: (B, ...) x_0; nfe: denoiser evaluations per sample; reward_evals: reward
    forward passes per sample; choices: (num_blocks, B) index of the kept candidate."""

    sample: torch.Tensor
    nfe: int
    reward_evals: int
    choices: torch.Tensor


def _candidate_noise(shape, generators, B: int, N: int, x: torch.Tensor) -> torch.Tensor:
    """(B*N, ...) noise, sample-major; candidate n of sample b from generators[b], n in order."""
    if generators is None or isinstance(generators, torch.Generator):
        noise = torch.randn((B * N, *shape), generator=generators, dtype=torch.float32)
    else:
        if len(generators) != B:
            raise ValueError(f"generators must have one generator per sample ({B}), got {len(generators)}")
        noise = torch.cat([torch.randn((N, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=x.device, dtype=x.dtype)


def _candidates(denoiser: Denoiser, x: torch.Tensor, pred: torch.Tensor, schedule: NoiseSchedule, ts: torch.Tensor,
                steps: range, cond_n: Any, config: CoDeConfig, generators) -> tuple[torch.Tensor, int]:
    """The (B*N, ...) candidates after the DDIM steps ``steps`` of one block from ``x`` (B, ...), whose
    prediction ``pred`` is known; and the denoiser evaluations per sample it took."""
    B, N, S = x.shape[0], int(config.num_candidates), len(ts)
    # Every candidate starts from x: its first prediction is the shared one.
    xc, pc = x.repeat_interleave(N, 0), pred.repeat_interleave(N, 0)
    nfe = 0
    for i in steps:
        t = ts[i]
        prev_t = ts[i + 1] if i + 1 < S else torch.tensor(-1)
        if i > steps.start:
            pc = denoiser(xc, t.expand(B * N).to(x.device), cond_n)
            nfe += N
        noise = _candidate_noise(tuple(x.shape[1:]), generators, B, N, x)
        xc = ddim_step(pc, t, xc, schedule, prev_t, config.eta, noise=noise).prev_sample
    return xc, nfe


@torch.no_grad()
def code_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    cond: Any = None,
    *,
    score_fn: ScoreFn,
    config: CoDeConfig = CoDeConfig(),
    decode: Callable[[torch.Tensor], torch.Tensor] = identity,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
) -> CoDeOutput:
    """Sample with blockwise best-of-N search on the DDIM sampler of the core.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> prediction`` (CFG already inside); it is called on
            batches of B*N candidates with the conditioning repeated sample-major.
        x: (B, ...) initial noise x_T.
        timesteps: (N_steps,) descending integer timesteps.
        score_fn: ``images -> (B',)`` weighted reward of a batch of images (no gradient needed).
        decode: map from x0 to the images the reward reads.
        generators: one ``torch.Generator`` per sample.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.long)
    B, N, S = x.shape[0], int(config.num_candidates), len(ts)
    cond_n = repeat_cond(cond, N)
    nfe = reward_evals = 0
    pred = None  # prediction at the current x, if already known
    choices = []
    for start in range(0, S, config.block_size):
        stop = min(start + config.block_size, S)
        if pred is None:
            pred = denoiser(x, ts[start].expand(B).to(x.device), cond)
            nfe += 1
        xc, block_nfe = _candidates(denoiser, x, pred, schedule, ts, range(start, stop), cond_n, config, generators)
        nfe += block_nfe
        if N == 1:  # nothing to choose from: no scoring, so N = 1 is exactly plain sampling
            x, pred = xc, None
            choices.append(torch.zeros(B, dtype=torch.long))
            continue
        if stop < S:  # score x0_hat at the candidates' end state; keep the prediction
            t_next = ts[stop]
            pc = denoiser(xc, t_next.expand(B * N).to(x.device), cond_n)
            nfe += N
            _, x0c = schedule.to_eps_x0(pc, xc, t_next.expand(B * N))
        else:
            pc, x0c = None, xc
        scores = score_fn(decode(x0c))
        if scores.shape != (B * N,):
            raise ValueError(f"score_fn must return shape ({B * N},) (one score per image), got {tuple(scores.shape)}")
        scores = scores.reshape(B, N)
        reward_evals += N
        best = torch.nan_to_num(scores.float(), nan=-torch.inf).argmax(1).cpu()  # (B,)
        rows = torch.arange(B) * N + best
        x = xc[rows.to(x.device)]
        pred = pc[rows.to(x.device)] if pc is not None else None
        choices.append(best)
    return CoDeOutput(sample=x, nfe=nfe, reward_evals=reward_evals, choices=torch.stack(choices))
