"""The only code that touches peft's LoRA layer internals; every assumption is checked here.

peft's ``LoraLayer`` can run a *mixed batch*: with ``adapter_names=[name per row]`` in its forward
kwargs, row b gets ``base(x_b) + scaling * B_name A_name x_b`` (``"__base__"`` = no adapter). peft
only passes that argument through its own ``PeftModel`` (a forward pre-hook on every LoRA layer);
diffusers models do not, and ``cross_attention_kwargs={"adapter_names": ...}`` is silently ignored.
:func:`route` installs the same pre-hook on the LoRA layers of any diffusers model for the duration
of one forward.

Switching which adapter runs (sequential mode, Rewarded Soup, the base) writes the layers'
``_active_adapter`` / ``_disable_adapters`` / ``scaling`` directly instead of calling
``set_adapter``: the public call also flips ``requires_grad`` of the adapter weights, which must
not change under an RL trainer. :class:`LayerState` restores all three afterwards.

When one model runs on every row of a forward, :func:`swapped` runs it at the cost of the base
model: the LoRA layers' base weights are swapped (``.data``) for cached merged weights W + dW, and
the adapter branches are off (an unmerged LoRA adds 4 small kernels per layer, ~5-15% on a GPU).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from functools import partial

import torch

MIN_PEFT = (0, 17, 1)  # the floors the suite passes with (requirements/floor.txt)
MIN_DIFFUSERS = (0, 35, 2)
_LAYER_ATTRS = ("_active_adapter", "_disable_adapters", "scaling", "lora_A", "lora_B", "merged", "use_dora",
                "get_delta_weight", "get_base_layer")

__all__ = ["check_versions", "lora_layers", "adapters_on", "dora_adapters", "biased_adapters", "is_merged", "route",
           "active", "rescaled", "scaled_sum", "LayerState", "merged_weights", "weights_version", "swapped", "blocks"]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_versions() -> None:
    """Raise RuntimeError if the installed peft / diffusers lack what this module relies on."""
    from ..versions import check_stack

    check_stack()
    import diffusers
    import peft
    from peft.tuners.lora import LoraLayer

    if _version(peft.__version__) < MIN_PEFT:
        raise RuntimeError(f"diffblend needs peft >= {'.'.join(map(str, MIN_PEFT))}, found {peft.__version__}")
    if _version(diffusers.__version__) < MIN_DIFFUSERS:
        raise RuntimeError(
            f"diffblend needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))}, found {diffusers.__version__}")
    for attr in ("_mixed_batch_forward", "_check_forward_args"):
        if not hasattr(LoraLayer, attr):
            raise RuntimeError(
                f"peft {peft.__version__}: LoraLayer has no {attr}; per-sample adapter batches are unavailable")


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft ``LoraLayer`` inside ``model``, checked to expose the attributes used here."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            missing = [a for a in _LAYER_ATTRS if not hasattr(module, a)]
            if missing:
                raise RuntimeError(f"peft LoRA layer {name!r} lacks {missing}: unsupported peft version")
            layers.append(module)
        elif isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"module {name!r} holds a non-LoRA peft adapter ({type(module).__name__}); only LoRA can be blended")
    return layers


def adapters_on(layers: Sequence[torch.nn.Module], load_order: Sequence[str] = ()) -> list[str]:
    """Adapter names present on the layers, in load order.

    ``load_order`` is the model's ``peft_config`` keys (peft inserts an adapter's config when it
    injects it and pops it on delete, so the dict's order is the load order). The walk over the
    layers gives another order when the first adapted layer belongs to a later adapter (adapter a
    on ``to_k``, b on ``to_q``: ``attn1.to_q`` comes first), which would hand a list of weights to
    the wrong adapters. Names on the layers but not in ``load_order`` follow, in walk order.
    """
    found: dict[str, None] = {}
    for layer in layers:
        found.update(dict.fromkeys(layer.lora_A.keys()))
    ordered = [n for n in load_order if n in found]
    return ordered + [n for n in found if n not in ordered]


def dora_adapters(layers: Sequence[torch.nn.Module]) -> set[str]:
    """Names of the adapters that use DoRA on at least one layer."""
    return {n for layer in layers for n, on in layer.use_dora.items() if on}


def biased_adapters(layers: Sequence[torch.nn.Module]) -> set[str]:
    """Names of the adapters with a bias on lora_B (``lora_bias=True``) on at least one layer: their
    update is not W + dW alone (peft's ``get_delta_weight`` leaves the bias out)."""
    return {n for layer in layers for n, on in getattr(layer, "lora_bias", {}).items() if on}


def is_merged(layers: Sequence[torch.nn.Module]) -> bool:
    """True if some adapter is merged (fused) into a base weight, so the base is not the base."""
    return any(layer.merged for layer in layers)


def _adapter_names_hook(module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


@contextlib.contextmanager
def route(layers: Sequence[torch.nn.Module], names: Sequence[str]) -> Iterator[None]:
    """Within the block, row b of every LoRA layer's input uses adapter ``names[b]``.

    Layers whose input is not batch-first with len(names) rows raise peft's ValueError (they are
    never silently mis-routed). Adapters are enabled for the block (a disabled layer would ignore
    ``adapter_names``) and the previous state is restored after.
    """
    names = list(names)
    state = LayerState(layers)
    handles = []
    try:
        for layer in layers:
            layer._disable_adapters = False
            handles.append(layer.register_forward_pre_hook(partial(_adapter_names_hook, names=names), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        state.restore()


class LayerState:
    """Snapshot of which adapters are active, whether adapters are disabled, and the scalings."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self._saved = [
            (layer, list(layer.active_adapters), layer._disable_adapters, dict(layer.scaling)) for layer in layers
        ]

    def restore(self) -> None:
        for layer, active, disabled, scaling in self._saved:
            layer._active_adapter = active
            layer._disable_adapters = disabled
            layer.scaling.clear()
            layer.scaling.update(scaling)

    def original_scaling(self, index: int) -> dict:
        return self._saved[index][3]


@contextlib.contextmanager
def active(layers: Sequence[torch.nn.Module], name: str | None) -> Iterator[None]:
    """Within the block, only adapter ``name`` runs (``None`` or ``"__base__"``: no adapter)."""
    state = LayerState(layers)
    try:
        for layer in layers:
            if name is None or name == "__base__":
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [name]
        yield
    finally:
        state.restore()


@contextlib.contextmanager
def rescaled(layers: Sequence[torch.nn.Module], factor: float) -> Iterator[None]:
    """Within the block, every adapter's ``scaling`` is ``factor`` times its own (a LoRA scale)."""
    if factor == 1.0:
        yield
        return
    state = LayerState(layers)
    try:
        for layer in layers:
            for n in layer.scaling:
                layer.scaling[n] *= factor
        yield
    finally:
        state.restore()


@contextlib.contextmanager
def scaled_sum(layers: Sequence[torch.nn.Module], scales: dict[str, float]) -> Iterator[None]:
    """Within the block, every layer computes ``W x + sum_i s_i * scaling_i * B_i A_i x``.

    That is the layer with weight ``W + sum_i s_i * scaling_i * B_i A_i``: the exact
    weight-space sum of the adapters' delta-W (what peft's ``add_weighted_adapter(...,
    combination_type="cat")`` builds as one adapter), without merging or copying any weight.
    """
    state = LayerState(layers)
    names = [n for n, s in scales.items() if s != 0.0]
    try:
        for i, layer in enumerate(layers):
            layer._disable_adapters = not names
            layer._active_adapter = list(names)
            for n in names:
                if n in layer.scaling:
                    layer.scaling[n] = state.original_scaling(i)[n] * float(scales[n])
        yield
    finally:
        state.restore()


# -- merged weights: one model for every row at the cost of the base ---------------------------

def merged_weights(layers: Sequence[torch.nn.Module], scales: dict[str, float]) -> list[torch.Tensor | None]:
    """Per layer, ``W + sum_i scales[i] * dW_i`` (dW_i = peft's ``get_delta_weight``: s_i B_i A_i),
    or None where no adapter in ``scales`` touches the layer. Computed without autograd."""
    out: list[torch.Tensor | None] = []
    with torch.no_grad():
        for layer in layers:
            terms = [(n, s) for n, s in scales.items() if s != 0.0 and n in layer.lora_A]
            if not terms:
                out.append(None)
                continue
            w = layer.get_base_layer().weight.detach().clone()
            for n, s in terms:
                w += float(s) * layer.get_delta_weight(n).to(w.dtype)
            out.append(w)
    return out


class _Storage:
    """Equal to another only while both refer to the same live tensor storage. A weak reference:
    a storage freed and a new one allocated at its address (a re-loaded adapter, ``.half()`` then
    ``.float()``) never match, as data pointers would."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t.untyped_storage())

    def __eq__(self, other: object) -> bool:
        s = self.ref()
        return isinstance(other, _Storage) and s is not None and s is other.ref()

    __hash__ = None  # type: ignore[assignment]


def weights_version(layers: Sequence[torch.nn.Module], names: Sequence[str]) -> tuple:
    """A key that compares unequal whenever what merged weights of ``names`` are made of changes: a
    base weight or LoRA factor modified in place (optimizer steps, load_state_dict: the tensors'
    version counters) or replaced (``.to(device / dtype)``, a re-loaded adapter: the storages), or an
    adapter's ``scaling`` (diffusers' ``set_adapters(names, weights)``, a LoRA scale), so that cached
    merged weights are never stale. Writes through ``.data`` bypass PyTorch's version counters: call
    ``Blender.refresh()`` after them."""
    key: list = []
    for layer in layers:
        tensors = [layer.get_base_layer().weight]
        for n in names:
            if n in layer.lora_A:
                tensors += [layer.lora_A[n].weight, layer.lora_B[n].weight]
                key.append(float(layer.scaling[n]))
        key += [(_Storage(t), t.storage_offset(), t._version) for t in tensors]
    return tuple(key)


@contextlib.contextmanager
def swapped(layers: Sequence[torch.nn.Module], weights: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Within the block, every layer runs as its base layer with weight ``weights[i]`` (None: unchanged)
    and no adapter branch; the original weight tensors and adapter state are restored after."""
    state = LayerState(layers)
    saved = []
    try:
        for layer, w in zip(layers, weights):
            layer._disable_adapters = True
            if w is not None:
                param = layer.get_base_layer().weight
                saved.append((param, param.data))
                param.data = w
        yield
    finally:
        for param, data in saved:
            param.data = data
        state.restore()


def _block_forward(base: torch.nn.Module, spans: Sequence[tuple[int, int]], weights: Sequence[torch.Tensor]):
    """A forward for ``base`` (Linear / Conv2d) applying weights[j] to rows spans[j]; rows stay in order."""
    if isinstance(base, torch.nn.Linear):
        def one(x, w):
            return torch.nn.functional.linear(x, w, base.bias)
    elif isinstance(base, torch.nn.Conv2d):
        def one(x, w):
            return base._conv_forward(x, w, base.bias)
    else:
        raise ValueError(f"cannot run a {type(base).__name__} per row block; use mode='sequential'")

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != spans[-1][1]:
            raise ValueError(f"row blocks cover {spans[-1][1]} rows, the layer input has {x.shape[0]}")
        return torch.cat([one(x[s:e], w) for (s, e), w in zip(spans, weights)])

    return forward


@contextlib.contextmanager
def blocks(layers: Sequence[torch.nn.Module], spans: Sequence[tuple[int, int]],
           weights: Sequence[Sequence[torch.Tensor | None]]) -> Iterator[None]:
    """Within the block, rows ``spans[j]`` (contiguous, in order) of every layer run with weight
    ``weights[j][layer]`` (None: the base weight), adapter branches off: a mixed batch at the cost
    of the base on the same rows, with slices instead of peft's per-layer row gathers."""
    state = LayerState(layers)
    patched = []
    try:
        for i, layer in enumerate(layers):
            layer._disable_adapters = True
            base = layer.get_base_layer()
            ws = [w[i] if w[i] is not None else base.weight for w in weights]
            if all(w is base.weight for w in ws):
                continue
            patched.append((base, base.__dict__.get("forward")))  # an instance forward (a hook) is kept
            base.forward = _block_forward(base, spans, ws)
        yield
    finally:
        for base, own in patched:
            if own is None:
                del base.forward
            else:
                base.forward = own
        state.restore()
