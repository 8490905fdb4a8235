"""Blend the LoRA adapters of one shared base model at every forward call.

Given a :class:`~diffblend.core.blend.Blend` (w over adapter names, lambda, method, seed), a call of
the model on a batch x of B rows returns, for every row,

    mpa :  sum_k c_k * model_k(x)          c = [(1 - lambda), lambda * w]  over [base, adapters]
    ls  :  model_{k_j}(x)                  k_j ~ Categorical(c) per sample j and step (core.ls_choices)
    soup:  model with W + lambda * sum_i w_i * dW_i   (Rewarded Soup, weight space; see baselines.soup)

The rows may hold G stacked groups of the same samples (G = 2 for classifier-free guidance, as
diffusers stacks ``[uncond; cond]``): row r is sample ``r % (B // G)``, so both halves of a sample
get the same LS draw. The maths is the core blend maths only (coefficients, combine, ls_choices).

Two execution modes give the same numbers:
  * ``"batched"``: one forward of K*B rows (MPA: row block k is model k; LS: rows sorted by their
    draw, one gather in and one out). Without autograd every LoRA layer runs each row block with
    that model's cached merged weight W + dW (``_compat.blocks``: slices, no per-layer gathers);
    under autograd, peft's mixed-batch ``adapter_names`` routing (``_compat.route``).
  * ``"sequential"``: K forwards of B rows, each model alone (merged weights when cached).
``"auto"`` picks batched, measured faster with benchmarks/bench_cost.py: SD 1.5-sized UNet, fp32,
H100, CFG, 10 steps, MPA m = 2: batched 1.67x / sequential 1.96x the base at B = 1, 1.91x / 1.98x
at B = 4; tiny UNet on a CPU: 1.81x / 2.06x. Batched needs K times the activation memory of one
forward: choose "sequential" when memory is short. DoRA adapters (no mixed batches in peft, no
merged cache) always run sequentially under "auto".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..core.blend import BASE, Blend, combine, ls_choices, step_key
from ..core.rows import RowBlend
from . import _compat

MODES = ("auto", "batched", "sequential")
# Tensors passed to the model that have no batch dimension even when their first size equals B.
_NOT_BATCHED = frozenset({"img_ids", "txt_ids"})
# Keyword arguments through which diffusers models take a LoRA scale ({"scale": s}).
_LORA_SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")

__all__ = ["MODES", "Blender", "resolve_mode"]


def resolve_mode(mode: str, uses_dora: bool = False) -> str:
    """"auto" -> "batched" (the faster on GPU and CPU), "sequential" with DoRA; other modes as given."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "sequential" if uses_dora else "batched"
    return mode


def _map_batch(value: Any, B: int, fn: Callable[[torch.Tensor], torch.Tensor], key: str = "") -> Any:
    """Apply fn to every tensor in value (nested dicts/lists) whose first dimension is the batch B."""
    if key in _NOT_BATCHED:
        return value
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() > 0 and value.shape[0] == B else value
    if isinstance(value, Mapping):
        return {k: _map_batch(v, B, fn, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_map_batch(v, B, fn) for v in value)
    return value


def _first(out: Any) -> torch.Tensor:
    """The prediction in a model output: ``(pred, ...)`` or a diffusers ``BaseOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _replace_first(out: Any, pred: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return pred
    if isinstance(out, tuple):
        return (pred, *out[1:])
    key = next(iter(out.keys()))
    return type(out)(**{**out, key: pred})


class Blender:
    """Runs one diffusers model (UNet / transformer with LoRA adapters loaded) as a blend.

    Args:
        model: the shared base with its adapters (``pipe.unet`` or ``pipe.transformer``).
        mode: "auto", "batched" or "sequential".
        merge_cache: run a single model on all rows (or a row block) with cached merged weights
            W + dW (the cost of the base; one copy of the adapted layers' weights per adapter, e.g.
            357 MiB fp32 for SD 1.5's attention projections; rebuilt when a weight changes). Not
            used for DoRA or a bias on lora_B (``lora_bias``), nor under autograd when a LoRA factor
            requires grad (training).
    """

    def __init__(self, model: torch.nn.Module, mode: str = "auto", merge_cache: bool = True):
        _compat.check_versions()
        resolve_mode(mode)  # validate now
        self.model = model
        self.mode = mode
        self.merge_cache = merge_cache
        self._cache: dict = {}
        # the model's own forward signature (a torch.compile'd model's forward takes *args, **kwargs)
        core = getattr(model, "_orig_mod", model)
        params = list(inspect.signature(type(core).forward).parameters.values())[1:]  # drop self
        self._signature = inspect.Signature(params)
        self._sample_arg = params[0].name  # "sample" (UNet) or "hidden_states" (transformers)
        self._var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's LoRA layers (after adapters were loaded or deleted)."""
        self.layers = _compat.lora_layers(self.model)
        self._configs = dict(getattr(self.model, "peft_config", None) or {})  # strong refs: ids stay unique
        self.adapter_names = _compat.adapters_on(self.layers, list(self._configs))  # load order
        self.dora = _compat.dora_adapters(self.layers)
        self._no_merge = self.dora | _compat.biased_adapters(self.layers)  # W + dW is not the adapter
        self._cache = {}

    def sync(self) -> None:
        """:meth:`refresh` if adapters were loaded, deleted or replaced on the model since (e.g. through
        diffusers' ``load_lora_weights`` / ``delete_adapters``: a new adapter under an old name can
        target other layers)."""
        configs = getattr(self.model, "peft_config", None) or {}
        if list(configs) != list(self._configs) or any(configs[k] is not v for k, v in self._configs.items()):
            self.refresh()

    def _weights(self, key: Any, scales: dict[str, float]) -> list:
        """Merged weights for ``scales`` from the cache, rebuilt if any weight changed since."""
        version = _compat.weights_version(self.layers, list(scales))
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            # keep one soup (w changes between calls), one entry per adapter; drop stale entries
            # (e.g. copies on the device the model left)
            self._cache = {k: v for k, v in self._cache.items() if k != key and not (k[0] == "soup" == key[0])
                           and v[0] == _compat.weights_version(self.layers, list(v[2]))}
            hit = self._cache[key] = (version, _compat.merged_weights(self.layers, scales), dict(scales))
        return hit[1]

    def _can_merge(self, names) -> bool:
        """Merged weights are exact for values and for gradients w.r.t. the input (e.g. reward
        guidance), but give no gradient to the LoRA factors: not when one of them is being trained.
        Nor under accelerate's per-layer offload hooks (``enable_sequential_cpu_offload``): they
        load each layer's own weights at its forward (the stored weights are on the meta device)."""
        if not self.merge_cache or any(n in self._no_merge for n in names):
            return False
        if any(getattr(layer.get_base_layer(), "_hf_hook", None) is not None for layer in self.layers):
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(m[n].weight.requires_grad for layer in self.layers for m in (layer.lora_A, layer.lora_B)
                       for n in names if n in m)

    def _routed(self, names: list[str], spans: list[tuple[int, int]] | None = None):
        """Context in which row r runs model ``names[r]``: merged weights per contiguous row block
        (``spans`` given: rows spans[j] all run the j-th distinct model), else peft's mixed batch."""
        distinct = list(dict.fromkeys(names))
        if spans is not None and self._can_merge(distinct):
            weights = [[None] * len(self.layers) if n == BASE else self._weights(("one", n), {n: 1.0})
                       for n in distinct]
            return _compat.blocks(self.layers, spans, weights)
        return _compat.route(self.layers, names)

    def _one(self, name: str):
        """Context in which ``name`` (an adapter or the base) runs on every row."""
        if name == BASE or not self._can_merge([name]):
            return _compat.active(self.layers, name)
        return _compat.swapped(self.layers, self._weights(("one", name), {name: 1.0}))

    def resolve(self, blend: Blend | None, mode: str | None = None) -> str:
        """The execution mode ("batched" / "sequential") this blend runs in."""
        dora = blend is not None and any(n in self.dora for n, _ in blend.active())
        return resolve_mode(mode or self.mode, dora)

    def check(self, blend: Blend | None, mode: str) -> None:
        """Refuse blends that cannot run on this model in this mode (named adapter and reason)."""
        if _compat.is_merged(self.layers):
            raise ValueError(
                "the model has fused (merged) LoRA weights, so its weights are not the base model's; "
                "unfuse them first (pipe.unfuse_lora())")
        if blend is None:
            return
        missing = [n for n in blend.names if n not in self.adapter_names]
        if missing:
            raise ValueError(f"weights name adapter(s) {missing} that are not loaded; loaded: {self.adapter_names}")
        dora = sorted(n for n, c in blend.active() if n in self.dora)
        if dora and blend.method == "soup":
            raise ValueError(
                f"adapter(s) {dora} use DoRA, whose weight update is not linear in the adapter; "
                f"Rewarded Soup (a weighted sum of delta-W) is undefined for them")
        if dora and mode == "batched":
            raise ValueError(f"adapter(s) {dora} use DoRA, which peft cannot run in mixed batches; use mode='sequential'")

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, forward: Callable, blend: Blend | None, groups: int, args: tuple, kwargs: dict,
                mode: str | None = None, *, checked: bool = False) -> Any:
        """Call ``forward(*args, **kwargs)`` (the model's own forward) as the blend ``blend``.

        Args:
            forward: the unwrapped forward of ``self.model``.
            blend: the blend; None runs the base model (no adapter).
            groups: G, how many stacked copies of the samples the batch holds (2 with CFG).
            checked: the caller already synced the adapters, checked the blend (:meth:`check`, and a
                per-sample blend's number of samples) and resolved ``mode`` for the whole run
                (``BlendPipeline`` does, once per pipeline call): not done again at this call.
        """
        if not checked:
            self.sync()
        bound = self._signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        if self._var_kw is not None:
            call.update(call.pop(self._var_kw, {}))
        x = call[self._sample_arg]
        B = x.shape[0]
        if B % groups:
            raise ValueError(f"batch of {B} rows is not {groups} stacked groups of samples")
        if not checked:
            mode = self.resolve(blend, mode)
            self.check(blend, mode)
            if isinstance(blend, RowBlend):
                blend.check_samples(B // groups)
        if blend is None:
            with _compat.active(self.layers, None):
                return forward(**call)
        # A LoRA scale in the attention kwargs (``cross_attention_kwargs={"scale": s}``): diffusers'
        # forward would multiply the scaling of the *active* adapters only, which neither per-row
        # routing nor merged weights see; here every adapter's scaling is s times its own instead.
        scale = 1.0
        for name in _LORA_SCALE_KWARGS:
            if isinstance(call.get(name), Mapping) and "scale" in call[name]:
                call[name] = dict(call[name])
                scale *= float(call[name].pop("scale"))
        with _compat.rescaled(self.layers, scale):
            return self._blend_forward(forward, blend, groups, call, mode, B)

    def _blend_forward(self, forward: Callable, blend: Blend, groups: int, call: dict, mode: str, B: int) -> Any:
        """:meth:`forward` once the call is bound and checked: ``call`` holds the model's arguments."""
        if blend.method == "soup":
            if isinstance(blend, RowBlend):
                return self._soup_rows(forward, blend, groups, call, B)
            with self._soup(blend):
                return forward(**call)
        names = blend.model_names
        if blend.method == "ls":
            step = step_key(call.get("timestep", 0))
            if blend.ls_draws == "iid":  # the paper's draws
                draw = ls_choices(blend.coefficients(), blend.seed, step, B // groups, sample_keys=blend.sample_keys)
            else:  # stratified over the run's step grid (Blend.on_grid)
                draw = blend.choices(step, B // groups)
            per_row = draw.repeat(groups)  # row r is sample r % (B // G)
            if bool((per_row == per_row[0]).all()):  # one model for all rows (always when B = 1):
                with self._one(names[int(per_row[0])]):  # no per-row gathers
                    return forward(**call)
            if mode == "batched":
                return self._ls_batched(forward, call, per_row, names, B)
            return self._sequential_rows(forward, call, per_row, names, B)
        active, coeffs = blend.active_coefficients(groups)  # base first; (K,) or per-row (K, B) for a RowBlend
        if len(active) == 1 and bool((coeffs == 1.0).all()):  # one-hot w with lambda = 1, or lambda = 0
            with self._one(active[0]):
                return forward(**call)
        if mode == "batched":
            K = len(active)
            big = {k: _map_batch(v, B, lambda t: t.repeat(K, *([1] * (t.dim() - 1))), k) for k, v in call.items()}
            spans = [(k * B, (k + 1) * B) for k in range(K)]
            with self._routed([n for n in active for _ in range(B)], spans):
                out = forward(**big)
            pred = _first(out)
            preds = pred.reshape(K, B, *pred.shape[1:])  # row block k is model k
        else:
            outs = []
            for n in active:
                with self._one(n):
                    out = forward(**call)
                outs.append(_first(out))
            preds = torch.stack(outs)
        return _replace_first(out, combine(preds, coeffs))

    def _soup(self, blend: Blend, merge: bool = True):
        """Context in which the model runs as Rewarded Soup: W + lambda * sum_i w_i dW_i (merged weights
        are cached for one soup only, so per-sample soups pass merge=False: no rebuild at every step)."""
        scales = {n: blend.kl_strength * w for n, w in zip(blend.names, blend.weights) if w != 0.0}
        if merge and self._can_merge(scales):
            return _compat.swapped(self.layers, self._weights(("soup", tuple(sorted(scales.items()))), scales))
        return _compat.scaled_sum(self.layers, scales)

    def _soup_rows(self, forward, blend: RowBlend, groups: int, call: dict, B: int):
        """Per-sample soups: weights cannot differ within one forward, so one forward per distinct blend
        over the rows of its samples (row r is sample r % (B // G)), results put back in row order."""
        n = B // groups
        groups_of = blend.distinct()
        return self._rows_apart(forward, call, B, (
            (torch.tensor([g * n + j for g in range(groups) for j in samples]),
             self._soup(soup, merge=len(groups_of) == 1)) for soup, samples in groups_of))

    def _rows_apart(self, forward, call: dict, B: int, parts):
        """One forward per ``(rows, context)`` of ``parts`` (rows ascending), over those rows of the call and
        within its context; the results put back in row order (all rows in order: the call as it is)."""
        out, result = None, None
        for rows, context in parts:
            rows = rows.to(call[self._sample_arg].device)
            sub = call if len(rows) == B else \
                {key: _map_batch(v, B, lambda t: t[rows.to(t.device)], key) for key, v in call.items()}
            with context:
                out = forward(**sub)
            pred = _first(out)
            if result is None:
                result = pred.new_empty((B, *pred.shape[1:]))
            result[rows] = pred
        return _replace_first(out, result)

    def _ls_batched(self, forward, call, per_row, names, B):
        """LS in one forward: rows sorted by drawn model (one gather in, one out), one block per model."""
        if not self._can_merge([names[k] for k in per_row.unique().tolist()]):
            with _compat.route(self.layers, [names[k] for k in per_row.tolist()]):
                return forward(**call)
        order = torch.argsort(per_row, stable=True)
        counts = torch.bincount(per_row[order]).tolist()
        spans, start, routed = [], 0, []
        for k, c in enumerate(counts):
            if c:
                spans.append((start, start + c))
                routed += [names[k]] * c
                start += c
        dev = call[self._sample_arg].device
        sub = {key: _map_batch(v, B, lambda t: t[order.to(t.device)], key) for key, v in call.items()}
        with self._routed(routed, spans):
            out = forward(**sub)
        pred = _first(out)
        result = torch.empty_like(pred)
        result[order.to(dev)] = pred  # back to the caller's row order
        return _replace_first(out, result)

    def _sequential_rows(self, forward, call, per_row, names, B):
        """LS in sequential mode: one forward per drawn model over the rows that drew it."""
        return self._rows_apart(forward, call, B, (((per_row == k).nonzero().squeeze(1), self._one(names[k]))
                                                   for k in per_row.unique().tolist()))
