"""How rewards relate on a set of samples: do two rewards conflict (negative correlation)?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import torch

__all__ = ["pearson", "spearman", "reward_correlations"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors (0 when one is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as scipy.stats.rankdata."""
    x = x.double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    out = ranks.clone()
    for v in x.unique():
        m = x == v
        out[m] = ranks[m].mean()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) tensors."""
    return pearson(_ranks(a), _ranks(b))


def reward_correlations(scores: Mapping[str, torch.Tensor], groups: Sequence[str] | None = None) -> list[dict]:
    """For every pair of rewards: Pearson and Spearman correlations across samples.

    With ``groups`` (e.g. the prompt of each sample), also ``pearson_within``: the correlation after
    subtracting each group's mean from both rewards, i.e. between the per-prompt advantages the RL
    fine-tuning uses. A negative correlation means the two rewards conflict on these samples.

    Returns:
        ``[{"a": name, "b": name, "pearson": r, "spearman": rho, "pearson_within": r_w}, ...]``.
    """
    out = []
    for a, b in combinations(list(scores), 2):
        sa, sb = scores[a].flatten().cpu(), scores[b].flatten().cpu()
        if sa.shape != sb.shape:
            raise ValueError(f"scores of {a!r} and {b!r} have shapes {tuple(sa.shape)} and {tuple(sb.shape)}")
        row = {"a": a, "b": b, "pearson": pearson(sa, sb), "spearman": spearman(sa, sb)}
        if groups is not None:
            if len(groups) != len(sa):
                raise ValueError(f"groups has {len(groups)} entries for {len(sa)} samples")
            ca, cb = sa.double().clone(), sb.double().clone()
            for gname in set(groups):
                m = torch.tensor([g == gname for g in groups])
                ca[m] -= ca[m].mean()
                cb[m] -= cb[m].mean()
            row["pearson_within"] = pearson(ca, cb)
        out.append(row)
    return out
