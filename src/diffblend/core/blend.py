"""Blend maths of Diffusion Blend (Cheng et al., ICLR 2026, arXiv 2505.18547). Torch only.

Glossary (paper notation):
    m        number of reward-aligned models (one LoRA adapter per reward r_i)
    w        preference weights over the m adapters, a probability vector (sum_i w_i = 1)
    lambda   KL strength of DB-KLA: target KL weight alpha / lambda from a model aligned at alpha
    eps_i    prediction of adapter i at (x_t, t, c); eps_pre that of the base model

Every method is a linear combination of predictions over K = m + 1 models, ordered
[base, adapter_1, ..., adapter_m], with coefficients

    c = [(1 - lambda), lambda * w_1, ..., lambda * w_m]                           (joint MPA + KLA)

so DB-MPA is lambda = 1 (the base term vanishes and the base need not be run) and DB-KLA with a
single adapter is m = 1. eps-, v- and flow-velocity predictions are all affine in one another at a
fixed (x_t, t) with coefficients that sum to one, so the same combination is exact in any of them.

DB-MPA-LS replaces the weighted sum by one model drawn per step and per sample with probabilities c
(Prop. 2); that needs c >= 0, i.e. lambda <= 1.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .sampling import map_cond

BASE = "__base__"  # name of the base model in a blend, as in peft
METHODS = ("mpa", "ls", "soup")
KL_STRENGTH_WARN = 2.0  # the paper sweeps lambda in [0, 2]; far above, the extrapolation saturates images
LS_DRAWS = ("iid", "stratified", "golden")  # how DB-MPA-LS draws a sample's models over the steps
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the golden-ratio rotation of the "golden" sequences

__all__ = ["BASE", "KL_STRENGTH_WARN", "LS_DRAWS", "METHODS", "Blend", "blend_denoisers", "combine", "ls_choices",
           "step_key", "stratified_choices"]


def _check_number(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_options(method: str, seed: int, sample_keys: Sequence[int] | None, ls_draws: str
                   ) -> tuple[int, ...] | None:
    """:meth:`Blend.create`'s method, LS draws, seed and sample keys (as a tuple) checked."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if ls_draws not in LS_DRAWS:
        raise ValueError(f"ls_draws must be one of {LS_DRAWS}, got {ls_draws!r}")
    if ls_draws != "iid" and method != "ls":
        raise ValueError(f"ls_draws={ls_draws!r} applies to method 'ls' only, got method={method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if sample_keys is not None:
        sample_keys = tuple(sample_keys)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in sample_keys):
            raise ValueError(f"sample_keys must be integers, got {list(sample_keys)[:8]}")
    return sample_keys


def _check_kl_strength(kl_strength: float) -> float:
    """lambda as a float >= 0 (a warning far above the paper's range)."""
    lam = _check_number("kl_strength (lambda)", kl_strength)
    if lam < 0:
        raise ValueError(f"kl_strength (lambda) must be >= 0, got {lam}")
    if lam > KL_STRENGTH_WARN:
        warnings.warn(f"kl_strength (lambda) = {lam:g} is above {KL_STRENGTH_WARN:g}, the range the paper sweeps "
                      f"(0..2): the extrapolation (1 - lambda) eps_base + lambda eps_aligned amplifies the "
                      f"adapters' change {lam:g}-fold and usually saturates the images", stacklevel=3)
    return lam


def _check_adapter_names(adapter_names: Sequence[str] | None) -> tuple[str, ...] | None:
    """The adapter names as a tuple of unique strings, none of them the base."""
    if adapter_names is None:
        return None
    adapter_names = tuple(str(n) for n in adapter_names)
    if BASE in adapter_names:
        raise ValueError(
            f"adapter_names must not contain {BASE!r}: the base enters through kl_strength"
        )
    if len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"adapter_names must be unique, got {list(adapter_names)}")
    if not adapter_names:
        raise ValueError("adapter_names must name at least one adapter")
    return adapter_names


def _named_weights(weights: Mapping[str, float] | Sequence[float], adapter_names: tuple[str, ...] | None
                   ) -> tuple[tuple[str, ...], list[float]]:
    """(names, w as floats) from a dict (missing adapters: 0) or a list in adapter order."""
    if isinstance(weights, Mapping):
        if BASE in weights:
            raise ValueError(
                f"weights must not name {BASE!r}: set the base's share with kl_strength "
                f"(coefficient 1 - lambda)"
            )
        unknown = [k for k in weights if adapter_names is not None and k not in adapter_names]
        if unknown:
            raise ValueError(
                f"weights name unknown adapter(s) {unknown}; allowed: {list(adapter_names)}"
            )
        names = adapter_names if adapter_names is not None else tuple(str(k) for k in weights)
        return names, [_check_number(f"weights[{n!r}]", weights.get(n, 0.0)) for n in names]
    values = [_check_number(f"weights[{i}]", v) for i, v in enumerate(weights)]
    if adapter_names is None:
        raise ValueError("adapter_names is required when weights is a list")
    if len(values) != len(adapter_names):
        raise ValueError(
            f"weights has {len(values)} entries but there are {len(adapter_names)} "
            f"adapters {list(adapter_names)}; give one weight per adapter"
        )
    return adapter_names, values


def _probabilities(names: Sequence[str], values: list[float], normalize: bool) -> list[float]:
    """w checked as a probability vector (non-negative; sum 1 unless ``normalize``), divided by its sum."""
    if not names:
        raise ValueError("weights must name at least one adapter")
    negative = [n for n, v in zip(names, values) if v < 0]
    if negative:
        raise ValueError(
            f"weights must be >= 0 (w is a probability vector over rewards); negative for {negative}"
        )
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    if not normalize and abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"weights must sum to 1 (got {total:.6g}); pass normalize=True to rescale them (diffblend generate: --normalize)"
        )
    return [v / total for v in values]  # also removes round-off (1/3 written as 0.3333333), so sum(c) = 1


@dataclass(frozen=True)
class Blend:
    """A validated description of one blend: weights w over named adapters, lambda, method, seed.

    Build it with :meth:`Blend.create`, which validates its input once, here at the boundary.

    Attributes:
        names: adapter names, in adapter order (never contains ``"__base__"``).
        weights: w, one per adapter, non-negative, summing to 1.
        kl_strength: lambda >= 0 (1 = plain DB-MPA; < 1 conservative; > 1 extrapolates).
        method: ``"mpa"`` (weighted sum of predictions), ``"ls"`` (one model drawn per step and
            sample), or ``"soup"`` (Rewarded Soup: weight-space interpolation; the baseline).
        seed: seed of the LS draws (ignored by the other methods).
        sample_keys: optional per-sample integers (e.g. each image's noise seed) that key the LS
            draws instead of the sample's row in the batch, so an image draws the same adapters
            whatever batch it is generated in (a resumed sweep reproduces it).
        ls_draws: ``"iid"`` (the paper's: independent draws at every step), ``"stratified"``
            (each sample's draws over the run have counts within 1 of T * c_k, in a random order)
            or ``"golden"`` (a randomly rotated golden-ratio sequence: counts close to T * c_k in
            every window of steps, not only over the run); with both every step's draw is still
            Categorical(c), see :func:`stratified_choices`.
        timesteps: the run's step grid as :func:`step_key` values (distinct, in sampling order);
            stratified and golden draws need it (:meth:`on_grid`), iid draws ignore it.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    kl_strength: float = 1.0
    method: str = "mpa"
    seed: int = 0
    sample_keys: tuple[int, ...] | None = None
    ls_draws: str = "iid"
    timesteps: tuple[int, ...] | None = None

    @classmethod
    def create(
        cls,
        weights: Mapping[str, float] | Sequence[float],
        adapter_names: Sequence[str] | None = None,
        *,
        kl_strength: float = 1.0,
        method: str = "mpa",
        seed: int = 0,
        normalize: bool = False,
        sample_keys: Sequence[int] | None = None,
        ls_draws: str = "iid",
        timesteps: Sequence[float] | torch.Tensor | None = None,
    ) -> Blend:
        """Validate and build a blend.

        Args:
            weights: w as ``{name: w_i}`` or as a list in the order of ``adapter_names``. With a
                dict and ``adapter_names`` given, names missing from the dict get weight 0.
            adapter_names: the adapters available, in order. Required for a list of weights.
            kl_strength: lambda, >= 0.
            method: one of ``"mpa"``, ``"ls"``, ``"soup"``.
            seed: integer seed for the LS draws.
            normalize: divide w by its sum instead of requiring sum(w) = 1.
            sample_keys: per-sample integer keys of the LS draws (see the class docstring).
            ls_draws: ``"iid"``, ``"stratified"`` or ``"golden"`` (method "ls" only).
            timesteps: the run's timesteps (any spacing); stratified draws need them, here or
                later through :meth:`on_grid` (BlendPipeline reads them from its scheduler).

        Raises:
            ValueError: naming the argument and what is allowed.
        """
        sample_keys = _check_options(method, seed, sample_keys, ls_draws)
        lam = _check_kl_strength(kl_strength)
        if weights is None or isinstance(weights, (str, bytes)) or not isinstance(weights, (Mapping, Sequence)):
            raise TypeError(f"weights must be a dict {{adapter name: w}} or a list of numbers (one per adapter), "
                            f"got {type(weights).__name__} {weights!r}")
        names, values = _named_weights(weights, _check_adapter_names(adapter_names))
        values = _probabilities(names, values, normalize)
        if method == "ls" and lam > 1 + 1e-12:
            raise ValueError(
                f"method 'ls' needs non-negative coefficients, but kl_strength (lambda) = {lam} > 1 "
                f"gives the base coefficient 1 - lambda = {1 - lam:.3g} < 0 (Prop. 2 does not hold); "
                f"use method='mpa' to extrapolate"
            )
        if method == "ls":
            lam = min(lam, 1.0)  # 1 + round-off: a base coefficient of -2e-16 would refuse every LS draw
        blend = cls(names=tuple(names), weights=tuple(values), kl_strength=lam, method=method, seed=seed,
                    sample_keys=sample_keys, ls_draws=ls_draws)
        return blend if timesteps is None else blend.on_grid(timesteps)

    def on_grid(self, timesteps: Sequence[float] | torch.Tensor) -> Blend:
        """This blend on the step grid ``timesteps`` (the values the sampler passes as t, any
        spacing, descending as run; repeats, e.g. a second-order solver's, count once)."""
        keys = [step_key(t) for t in torch.as_tensor(timesteps).flatten()]
        keys = tuple(dict.fromkeys(keys))
        if not keys:
            raise ValueError("timesteps must hold at least one timestep")
        return replace(self, timesteps=keys)

    # -- coefficients --------------------------------------------------------------------------
    @property
    def model_names(self) -> tuple[str, ...]:
        """Names of the K = m + 1 models the coefficients refer to: ``("__base__", *names)``."""
        return (BASE, *self.names)

    def coefficients(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """c over [base, adapter_1..m] = [(1 - lambda), lambda * w_1, ..., lambda * w_m]; shape (K,)."""
        lam = self.kl_strength
        return torch.tensor([1.0 - lam, *(lam * w for w in self.weights)], dtype=dtype)

    def active(self) -> list[tuple[str, float]]:
        """(model name, coefficient) for every model whose coefficient is non-zero, base first."""
        return [(n, float(c)) for n, c in zip(self.model_names, self.coefficients()) if c != 0.0]

    def active_coefficients(self, groups: int = 1) -> tuple[list[str], torch.Tensor]:
        """Models with a non-zero coefficient and those coefficients, (K_active,): the same for every row
        (``groups`` is accepted so a per-sample :class:`~.rows.RowBlend` and a Blend are used alike)."""
        active = self.active()
        return [n for n, _ in active], torch.tensor([c for _, c in active], dtype=torch.float64)

    def as_dict(self) -> dict:
        return {
            "weights": dict(zip(self.names, self.weights)),
            "kl_strength": self.kl_strength,
            "method": self.method,
            "seed": self.seed,
            **({"ls_draws": self.ls_draws} if self.ls_draws != "iid" else {}),
        }

    def choices(self, step: int, num_samples: int) -> torch.Tensor:
        """The LS draws of this blend at ``step`` for ``num_samples`` samples; (B,) model indices.

        Keyed on the sample's row, or on ``sample_keys`` when given (then there must be one per sample).
        ``step`` is a :func:`step_key`; stratified draws look it up in :attr:`timesteps`.
        """
        if self.ls_draws == "iid":
            return ls_choices(self.coefficients(), self.seed, step, num_samples, sample_keys=self.sample_keys)
        if self.timesteps is None:
            raise ValueError(f"ls_draws={self.ls_draws!r} needs the run's step grid: Blend.create(..., "
                             f"timesteps=ts) or blend.on_grid(ts)")
        try:
            index = self.timesteps.index(int(step))
        except ValueError:
            raise ValueError(f"step key {step} is not on the blend's step grid {list(self.timesteps)[:6]}...: "
                             f"give the timesteps the sampler runs") from None
        return stratified_choices(self.coefficients(), self.seed, index, len(self.timesteps), num_samples,
                                  sample_keys=self.sample_keys, kind=self.ls_draws)


def combine(preds: torch.Tensor | Sequence[torch.Tensor], coeffs: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sum_k c_k * preds[k].

    Args:
        preds: (K, B, ...) stacked predictions (eps, v or flow velocity), or a list of K tensors.
        coeffs: (K,) coefficients, or (K, B) per-sample coefficients.

    Returns:
        (B, ...) the combined prediction, in the dtype of ``preds``.
    """
    if not isinstance(preds, torch.Tensor):
        preds = torch.stack(list(preds))
    coeffs = torch.as_tensor(coeffs, dtype=preds.dtype, device=preds.device)
    if coeffs.shape[0] != preds.shape[0]:
        raise ValueError(f"coeffs has {coeffs.shape[0]} entries for {preds.shape[0]} predictions")
    if coeffs.dim() > 2:
        raise ValueError(f"coeffs must have shape (K,) or (K, B), got {tuple(coeffs.shape)}")
    coeffs = coeffs.reshape(*coeffs.shape, *([1] * (preds.dim() - coeffs.dim())))
    return (coeffs * preds).sum(0)


def step_key(t: float | int | torch.Tensor) -> int:
    """An integer key for a timestep value (discrete t or continuous sigma*1000) used to seed LS."""
    if isinstance(t, torch.Tensor):
        t = t.flatten()[0].item()
    return int(round(float(t) * 1000))


def ls_choices(coeffs: torch.Tensor, seed: int, step: int, num_samples: int,
               sample_keys: Sequence[int] | None = None) -> torch.Tensor:
    """DB-MPA-LS draws: for each sample, the index of the one model to run at this step.

    Sample j's draw is the j-th uniform of a ``torch.Generator`` seeded by ``(seed, step)``, so it
    depends only on (seed, step, j): not on call order, batch splitting, or CFG (the cond and
    uncond halves of a sample use the same draw). With ``sample_keys``, sample j's uniform comes
    from its own generator seeded by ``(seed, step, sample_keys[j])`` instead, so the draw follows
    the sample, not its row. Index k is drawn with probability c_k.

    Args:
        coeffs: (K,) non-negative coefficients summing to 1, or (B, K): sample j draws with C[j]
            (per-sample blends, :class:`~.rows.RowBlend`; the uniforms are the same).
        seed: the blend's seed.
        step: a per-step key, e.g. ``step_key(t)``.
        num_samples: B.
        sample_keys: optional (B,) integer keys, one per sample.

    Returns:
        (B,) int64 indices into the K models.
    """
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).cpu()
    if (coeffs < 0).any():
        raise ValueError("ls_choices needs non-negative coefficients (lambda <= 1); use MPA")
    if sample_keys is None:
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
        u = torch.rand(num_samples, generator=gen, dtype=torch.float64)
    else:
        if len(sample_keys) != num_samples:
            raise ValueError(f"sample_keys has {len(sample_keys)} keys for {num_samples} samples")
        u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(_mix(seed, step, k)), dtype=torch.float64)
                       for k in sample_keys]) if num_samples else torch.zeros(0, dtype=torch.float64)
    cdf = torch.cumsum(coeffs / coeffs.sum(-1, keepdim=True), -1)
    if cdf.dim() == 2:  # per-sample probabilities: row j of the cdf for uniform j
        if cdf.shape[0] != num_samples:
            raise ValueError(f"coeffs has {cdf.shape[0]} rows for {num_samples} samples")
        return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(coeffs) - 1)


def stratified_choices(coeffs: torch.Tensor, seed: int, index: int, num_steps: int, num_samples: int,
                       sample_keys: Sequence[int] | None = None, kind: str = "stratified") -> torch.Tensor:
    """Stratified DB-MPA-LS draws: the models run by each sample at step ``index`` of ``num_steps``.

    A sample's draws over its T = num_steps steps are the inverse CDF of c at T points in [0, 1):

    * ``"stratified"``: the systematic points (u0 + j) / T, u0 ~ U(0, 1), in a uniformly random
      order. Model k gets a count within 1 of T c_k, with expectation exactly T c_k, and step i's
      draw is Categorical(c) for every i (P(k) = E[count_k] / T = c_k).
    * ``"golden"``: the points frac(u0 + i g), g = (sqrt(5) - 1) / 2, at step i. frac(u0 + i g) is
      U(0, 1) for each i, so step i's draw is Categorical(c); the golden-ratio rotation spreads
      every model's steps evenly over the run (any window of steps holds about its share).

    Either way each step's marginal draw is what Prop. 2 uses, while the sample's mix of models
    over its run has far less variance than with independent draws. Steps of one sample are
    dependent, so the law of the final sample may move by O(1/T) from iid's.

    Keyed like :func:`ls_choices`: on (seed, T, row j), or (seed, T, sample_keys[j]).

    Returns:
        (B,) int64 indices into the K models.
    """
    if not 0 <= index < num_steps:
        raise ValueError(f"index must be in [0, {num_steps}), got {index}")
    keys = None if sample_keys is None else tuple(int(k) for k in sample_keys)
    if keys is not None and len(keys) != num_samples:
        raise ValueError(f"sample_keys has {len(keys)} keys for {num_samples} samples")
    c = torch.as_tensor(coeffs, dtype=torch.float64).cpu()
    if (c < 0).any():
        raise ValueError("stratified_choices needs non-negative coefficients (lambda <= 1); use MPA")
    if kind not in LS_DRAWS[1:]:
        raise ValueError(f"kind must be one of {LS_DRAWS[1:]}, got {kind!r}")
    plan = _stratified_plan(tuple(c.tolist()), int(seed), int(num_steps), int(num_samples), keys, kind)
    return plan[:, index].clone()


@functools.lru_cache(maxsize=16)
def _stratified_plan(coeffs: tuple[float, ...], seed: int, T: int, B: int,
                     keys: tuple[int, ...] | None, kind: str) -> torch.Tensor:
    """(B, T) model index of every sample at every step (cached: one plan serves the T calls of a run)."""
    tag = 0x5752  # separates these streams from the iid draws'
    if keys is None:  # row j reads the j-th block of one stream: independent of the batch size
        u = torch.rand(B, T + 1, generator=torch.Generator().manual_seed(_mix(seed, tag, T)), dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(T + 1, generator=torch.Generator().manual_seed(_mix(seed, tag, T, k)),
                                    dtype=torch.float64) for k in keys]) if B else torch.zeros(0, T + 1)
    steps = torch.arange(T, dtype=torch.float64)
    if kind == "golden":
        points = (u[:, :1] + _GOLDEN * steps) % 1.0  # (B, T), step i's point is U(0, 1)
    else:
        points = (u[:, :1] + steps) / T  # (B, T) systematic, ascending; permuted below
    cdf = torch.cumsum(torch.tensor(coeffs, dtype=torch.float64), 0)
    cdf = cdf / cdf[-1]
    alloc = torch.searchsorted(cdf, points.contiguous(), right=True).clamp_(max=len(coeffs) - 1)
    if kind == "golden":
        return alloc
    return alloc.gather(1, u[:, 1:].argsort(1))  # a uniform random permutation per sample


def _mix(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing, so nearby inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def blend_denoisers(denoisers: Mapping[str, Callable], blend: Blend, groups: int = 1) -> Callable:
    """A denoiser that blends separate denoisers with ``blend`` (sequential execution).

    Args:
        denoisers: ``{name: denoiser(x_t, t, cond) -> pred}`` over ``"__base__"`` and the
            adapter names; only models with a non-zero coefficient are ever called (the base
            may be omitted when lambda = 1).
        blend: the blend; method "mpa" sums the predictions with the coefficients, method "ls"
            runs, for each sample, only the model drawn for it (:func:`ls_choices`). A per-sample
            :class:`~.rows.RowBlend` blends sample j with its own coefficients (row r is sample r % B).
        groups: G, how many stacked copies of the samples a batch holds: with G = 2 the
            denoiser can sit inside classifier-free guidance (:func:`core.cfg_denoiser`, batch
            [uncond (B); cond (B)]): LS rows j and B + j are one sample and share one draw.

    With G = 1 every row is its own sample (index = row); then guide each model *before*
    blending (guidance is linear, so for MPA guiding then blending equals blending then guiding).
    LS passes each model only its drawn rows (of x, t and cond), so a model guided with a fixed
    batch-sized uncond (``cfg_denoiser(model, s, uncond)``) does not fit there: use G = 2.
    """
    if blend.method == "soup":
        raise ValueError("method 'soup' blends weights, not predictions: use the adapter layer")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    names = blend.model_names
    missing = [n for n, c in blend.active() if n not in denoisers]
    if missing:
        raise ValueError(f"denoisers is missing models with non-zero coefficient: {missing}")

    def blended(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if blend.method == "mpa":
            active, coeffs = blend.active_coefficients(groups)  # (K,) or per-row (K, B) for a RowBlend
            preds = torch.stack([denoisers[n](x, t, cond) for n in active])
            return combine(preds, coeffs)
        if x.shape[0] % groups:
            raise ValueError(f"batch of {x.shape[0]} rows is not {groups} stacked groups of samples")
        choice = blend.choices(step_key(t), x.shape[0] // groups).repeat(groups).to(x.device)
        out = None
        for k in choice.unique().tolist():
            rows = (choice == k).nonzero().squeeze(1)
            sub_cond = _index_cond(cond, rows)
            pred = denoisers[names[k]](x[rows], t[rows] if t.dim() else t, sub_cond)
            if out is None:
                out = pred.new_empty((x.shape[0], *pred.shape[1:]))
            out[rows] = pred
        return out

    blended.blend = blend  # type: ignore[attr-defined]
    blended.groups = groups  # type: ignore[attr-defined]
    return blended


def _index_cond(cond, rows: torch.Tensor):
    """Select batch rows of a conditioning (tensor, dict/list of tensors, or None)."""
    return map_cond(cond, lambda t: t[rows.to(t.device)])
