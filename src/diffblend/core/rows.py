"""Per-sample blends: a different w (and lambda) for every sample of one batch. Torch only.

A strip along w, a sweep, or several users' requests then share one batched forward per step:

    rows = RowBlend.create([{"a": 1.0}, {"a": 0.5, "b": 0.5}, {"b": 1.0}], ["a", "b"], method="mpa")
    rows.coefficients()          # (B, K) = (3, 1 + m): row j is Blend j's c = [(1 - lambda_j), lambda_j w_j]

Sample j of the batch is blended exactly as a :class:`~.blend.Blend` with row j's weights would blend it
alone (same maths, same noise; only the float round-off of a bigger batch differs):

    mpa   eps_j = sum_k C[j, k] eps_k           one forward of K stacked row blocks, combined per row
    ls    model k_j ~ Categorical(C[j])         per-row probabilities, the same uniforms as a Blend
                                                 (keyed on the row, or on ``sample_keys``)
    soup  W + sum_i lambda_j w_ji dW_i          weights cannot differ within one forward: the adapter
                                                 layer runs one forward per distinct blend over its rows
                                                 (grouped; the cost of separate calls, in one pipeline call)

Under classifier-free guidance the model sees G stacked copies of the B samples ([uncond; cond]):
row r is sample r % B (:meth:`RowBlend.active_coefficients` repeats the coefficients G times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .blend import BASE, Blend, ls_choices

__all__ = ["RowBlend", "is_per_row"]


def is_per_row(weights: object) -> bool:
    """Whether ``weights`` is a list of per-sample weights (dicts, or lists in adapter order), not one w."""
    if isinstance(weights, (str, bytes, Mapping, torch.Tensor)) or not isinstance(weights, Sequence):
        return False
    return len(weights) > 0 and all(isinstance(w, (Mapping, Sequence)) and not isinstance(w, str) for w in weights)


@dataclass(frozen=True)
class RowBlend:
    """One :class:`Blend` per sample of a batch, over the same adapters, method and LS seed.

    Build it with :meth:`RowBlend.create`. ``rows[j]`` is sample j's blend.
    """

    rows: tuple[Blend, ...]
    sample_keys: tuple[int, ...] | None = None
    ls_draws = "iid"  # per-sample blends draw LS models independently at every step (the paper's draws)
    timesteps = None  # so no step grid is needed

    @classmethod
    def create(cls, weights: Sequence[Mapping[str, float] | Sequence[float]], adapter_names: Sequence[str] | None = None,
               *, kl_strength: float | Sequence[float] = 1.0, method: str = "mpa", seed: int = 0,
               normalize: bool = False, sample_keys: Sequence[int] | None = None) -> RowBlend:
        """Validate one blend per sample (each as :meth:`Blend.create` does).

        Args:
            weights: B per-sample weights, each ``{name: w_i}`` or a list in ``adapter_names`` order.
            kl_strength: lambda for every sample, or a list of B lambdas.
            method, seed, normalize: as for :meth:`Blend.create`, shared by every sample.
            sample_keys: B integer keys of the LS draws (see :class:`Blend`).

        Raises:
            ValueError: naming the sample (``weights[j]``) and what is wrong with it.
        """
        if not is_per_row(weights):
            raise ValueError("weights must be a non-empty list of per-sample weights (one dict or list per image)")
        n = len(weights)
        lams = list(kl_strength) if isinstance(kl_strength, Sequence) and not isinstance(kl_strength, str) else \
            [kl_strength] * n
        if len(lams) != n:
            raise ValueError(f"kl_strength has {len(lams)} values for {n} per-sample weights; give one or {n}")
        if sample_keys is not None:
            sample_keys = tuple(sample_keys)
            if len(sample_keys) != n:
                raise ValueError(f"sample_keys has {len(sample_keys)} keys for {n} per-sample weights")
        rows = []
        for j, (w, lam) in enumerate(zip(weights, lams)):
            try:
                rows.append(Blend.create(w, adapter_names, kl_strength=lam, method=method, seed=seed,
                                         normalize=normalize, sample_keys=sample_keys))
            except ValueError as exc:
                raise ValueError(f"weights[{j}] (sample {j}): {exc}") from None
        if len({b.names for b in rows}) > 1:  # dicts without adapter_names: each names its own adapters
            raise ValueError(f"per-sample weights must name the same adapters; got {sorted({b.names for b in rows})} "
                             f"(pass adapter_names to give missing ones weight 0)")
        return cls(rows=tuple(rows), sample_keys=sample_keys)

    # -- what every sample shares -------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.rows[0].names

    @property
    def model_names(self) -> tuple[str, ...]:
        return (BASE, *self.names)

    @property
    def method(self) -> str:
        return self.rows[0].method

    @property
    def seed(self) -> int:
        return self.rows[0].seed

    def __len__(self) -> int:
        return len(self.rows)

    # -- coefficients --------------------------------------------------------------------------
    def coefficients(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(B, K): row j is ``rows[j].coefficients()`` over [base, adapter_1..m]."""
        return torch.stack([b.coefficients(dtype) for b in self.rows])

    def active(self) -> list[tuple[str, tuple[float, ...]]]:
        """(model name, its B per-sample coefficients) for every model non-zero in some sample, base first."""
        c = self.coefficients()
        return [(n, tuple(c[:, k].tolist())) for k, n in enumerate(self.model_names) if bool((c[:, k] != 0).any())]

    def active_coefficients(self, groups: int = 1) -> tuple[list[str], torch.Tensor]:
        """Models used by some sample and their per-row coefficients for a batch of G stacked groups:
        (names, (K_active, G * B)), row r being sample r % B (``core.combine`` takes this shape)."""
        c = self.coefficients()
        keep = [k for k in range(c.shape[1]) if bool((c[:, k] != 0).any())]
        return [self.model_names[k] for k in keep], c[:, keep].T.repeat(1, groups)

    def choices(self, step: int, num_samples: int) -> torch.Tensor:
        """(B,) LS draws: sample j draws from its own probabilities C[j] (same uniforms as a Blend)."""
        self.check_samples(num_samples)
        return ls_choices(self.coefficients(), self.seed, step, num_samples, sample_keys=self.sample_keys)

    def check_samples(self, num_samples: int) -> None:
        """Refuse a batch whose number of samples is not the number of per-sample blends."""
        if num_samples != len(self.rows):
            raise ValueError(f"weights gives {len(self.rows)} per-sample blends but the batch holds {num_samples} "
                             f"samples (images = prompts x images per prompt); give one per image")

    def distinct(self) -> list[tuple[Blend, list[int]]]:
        """The distinct blends and the samples that use each, in order of first use (soup's groups)."""
        groups: dict[tuple, tuple[Blend, list[int]]] = {}
        for j, b in enumerate(self.rows):
            groups.setdefault((b.weights, b.kl_strength), (b, []))[1].append(j)
        return list(groups.values())

    def as_dict(self) -> dict:
        return {"rows": [b.as_dict() for b in self.rows], "method": self.method, "seed": self.seed}
