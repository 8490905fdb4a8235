"""Diffusion Blend inside an existing diffusers pipeline (SD 1.5, SDXL, the embedded default model, ...).

    pipe = StableDiffusionPipeline.from_pretrained(...)
    bp = BlendPipeline(pipe, adapters={"aesthetic": "aes.safetensors", "text": "txt.safetensors"})
    images = bp("a cat", weights={"aesthetic": 0.3, "text": 0.7}, kl_strength=1.0, method="mpa",
                num_inference_steps=50, guidance_scale=7.5, eta=1.0, generator=g).images

The user keeps the pipeline's own arguments; the blend (w, lambda, method, LS seed) is given per
call, so changing it costs nothing (no reload, no merge). During a call the pipeline's denoiser
(``pipe.unet`` or ``pipe.transformer``) has its forward wrapped by a :class:`~.adapters.Blender`;
diffusers pipelines call it on ``[uncond; cond]`` rows under CFG, and the wrapper combines every
adapter's prediction of both halves (guidance is linear, so blending guided predictions equals
guiding the blended one, Sec. 4 of the paper).

Methods (Cheng et al., ICLR 2026): ``"mpa"`` DB-MPA / DB-KLA (weighted sum of the predictions, with
the base at coefficient 1 - lambda), ``"ls"`` DB-MPA-LS (one model per sample and step, exact in
distribution only with a stochastic sampler: DDIM eta = 1, DDPM, or for flow matching (SD3, Flux)
:class:`~diffblend.schedulers.FlowMatchSDEScheduler` with noise_level > 0; with an ODE sampler such as
deterministic DDIM or flow-matching Euler it is a randomised heuristic and a warning is issued),
``"soup"`` Rewarded Soup (the baseline). Flow-matching transformers (SD3, Flux) go through the same
code: the blend of velocity predictions is the same linear combination.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapters.blender import Blender, resolve_mode
from .adapters.denoiser import blend_denoiser
from .adapters.loading import AdapterError, load_adapter
from .core.blend import Blend, step_key
from .core.rows import RowBlend, is_per_row
from .core.sampling import Denoiser

__all__ = ["BlendPipeline", "blend_denoiser", "AdapterError", "check_call_kwargs", "declared_samples"]


def _eta(pipe: Any, call_kwargs: Mapping[str, Any]) -> float:
    """The DDIM eta of this call: given, else the pipeline's own default (SD: 0, the zoo model: 1)."""
    if "eta" in call_kwargs:
        return float(call_kwargs["eta"])
    try:
        default = inspect.signature(pipe.__call__).parameters["eta"].default
    except (AttributeError, KeyError, TypeError, ValueError):  # not a callable with an eta argument
        return 0.0
    return float(default) if isinstance(default, (int, float)) else 0.0


def _is_stochastic(pipe: Any, call_kwargs: Mapping[str, Any]) -> bool:
    """Whether the pipeline's sampler injects fresh noise at every step (LS needs it, Prop. 2)."""
    scheduler = getattr(pipe, "scheduler", None)
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    noise_level = getattr(config, "noise_level", None)  # diffblend's FlowMatchSDEScheduler: 0 is the Euler ODE
    if isinstance(noise_level, (int, float)):
        return noise_level > 0
    if "DDPM" in name or "Ancestral" in name or "SDE" in name:
        return True
    if name.startswith("DDIM"):
        return _eta(pipe, call_kwargs) > 0
    if str(getattr(config, "algorithm_type", "")).startswith("sde-"):  # DPM-Solver's SDE variants
        return True
    return bool(getattr(config, "stochastic_sampling", False))


# Keywords diffusers' SD-family pipelines still read from **kwargs (deprecated, with a warning).
_DEPRECATED_KWARGS = ("callback", "callback_steps")
_OWN_KWARGS = ("weights", "kl_strength", "method", "blend_seed", "normalize", "sample_keys", "ls_draws", "mode")


def check_call_kwargs(pipe: Any, kwargs: Mapping[str, Any]) -> None:
    """Refuse keywords the pipeline does not declare (diffusers' ``**kwargs`` swallows misspellings), a
    non-positive ``num_images_per_prompt`` and a guidance scale that is not a finite number >= 0.

    Raises:
        TypeError: an unknown keyword, named with the closest known one.
        ValueError: a bad value, naming the argument.
    """
    import difflib

    from .checks import check_count, check_guidance_scale

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (AttributeError, TypeError, ValueError):  # not callable, or no signature to check against
        params = None
    if params is not None:
        kinds = {p.kind for p in params.values()}
        known = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if inspect.Parameter.VAR_KEYWORD in kinds:
            known |= set(_DEPRECATED_KWARGS)
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known | set(_OWN_KWARGS)), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{type(pipe).__name__} got an unexpected keyword argument {key!r}{hint} "
                                f"(BlendPipeline passes the pipeline's own arguments through and refuses others, "
                                f"which diffusers would silently ignore)")
    if kwargs.get("num_images_per_prompt") is not None:
        check_count(kwargs["num_images_per_prompt"], "num_images_per_prompt")
    if kwargs.get("guidance_scale") is not None:
        check_guidance_scale(kwargs["guidance_scale"])


def declared_samples(pipe: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The number of images a call of ``pipe`` makes, from its arguments as diffusers' pipelines compute
    ``batch_size``: 1 for a str prompt, len(prompt) for a list, else ``prompt_embeds.shape[0]`` (else an
    unconditional pipeline's ``batch_size``), times ``num_images_per_prompt`` (the call's, else the
    signature's default). None when the call declares none of them."""
    try:
        sig = inspect.signature(pipe.__call__)
        bound = sig.bind_partial(*args, **kwargs).arguments
    except (AttributeError, TypeError, ValueError):  # not callable, or arguments its signature refuses
        return None
    params = sig.parameters

    def given(name: str) -> Any:
        if name in bound:
            return bound[name]
        return params[name].default if name in params and params[name].default is not inspect.Parameter.empty \
            else None

    prompt, embeds, size = given("prompt"), given("prompt_embeds"), given("batch_size")
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, (list, tuple)):
        batch = len(prompt)
    elif isinstance(embeds, torch.Tensor) and embeds.dim() > 0:
        batch = int(embeds.shape[0])
    elif isinstance(size, int) and not isinstance(size, bool) and "prompt" not in params:
        batch = size
    else:
        return None
    per_prompt = given("num_images_per_prompt")
    return batch * (1 if per_prompt is None else int(per_prompt))


def _groups(rows: int, samples: int) -> int:
    """G, the stacked copies of the run's ``samples`` images in a denoiser call of ``rows`` rows."""
    if rows % samples:
        raise ValueError(
            f"the denoiser was called on {rows} rows, which is not a whole number of copies of the call's "
            f"{samples} image(s) (prompts x num_images_per_prompt, or prompt_embeds rows x num_images_per_prompt)")
    return rows // samples


def _pipeline_class(model: str | Path) -> Any:
    """The class that loads ``model``: diffusers' DiffusionPipeline, or the class a plug-in registered
    for the folder's ``_class_name`` (:mod:`diffblend.registry`; e.g. the zoo's DigitsPipeline)."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        from .registry import pipeline_class

        cls = pipeline_class(json.loads(index.read_text()).get("_class_name"))
        if cls is not None:
            return cls
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def _on_scheduler_grid(blend: Blend | None, pipe: Any, first_t: Any) -> Blend | None:
    """A stratified LS blend on the step grid of the pipeline's scheduler (set for this run).

    The model sees the scheduler's timesteps, or them / 1000 (flow-matching transformers such as
    Flux): the scale is the one whose grid holds the first call's timestep."""
    if blend is None or blend.ls_draws == "iid" or blend.timesteps is not None:
        return blend
    ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if ts is None:
        raise ValueError(f"ls_draws={blend.ls_draws!r} needs the step grid, but the pipeline's scheduler has "
                         f"no timesteps")
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    first = step_key(first_t) if first_t is not None else None
    for grid in (ts, ts / 1000):
        on = blend.on_grid(grid)
        if first is None or first in on.timesteps:
            return on
    raise ValueError(f"ls_draws={blend.ls_draws!r}: the model's timestep {first_t} is not on the scheduler's grid")


class BlendPipeline:
    """A diffusers pipeline whose denoiser blends named LoRA adapters at inference time.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer`` (the shared base).
        adapters: ``{name: path}`` of LoRA files / peft directories to load (see :meth:`load_adapter`).
            Adapters already on the denoiser (e.g. from ``pipe.load_lora_weights``) are kept and usable.
        mode: "auto" (batched; sequential for DoRA), "batched" or "sequential" (less memory).
        allow_pickle: accept pickle files (``.bin``, ``.ckpt``...) for adapters you trust.
        text_encoder: "refuse" (default) or "ignore" text-encoder LoRA components of adapter files.
        merge_cache: run a model that serves all rows (or a row block) with cached merged weights
            W + dW, at the cost of the base (memory: one copy of the adapted layers per adapter).
    """

    def __init__(self, pipe: Any, adapters: Mapping[str, str | Path] | None = None, *, mode: str = "auto",
                 allow_pickle: bool = False, text_encoder: str = "refuse", merge_cache: bool = True):
        if getattr(pipe, "unet", None) is not None:
            self.component = "unet"
        elif getattr(pipe, "transformer", None) is not None:
            self.component = "transformer"
        else:
            raise ValueError(f"pipe must have a unet or a transformer, got {type(pipe).__name__}")
        if getattr(pipe, "num_fused_loras", 0):
            raise AdapterError(
                f"the pipeline has {pipe.num_fused_loras} fused LoRA(s) in its weights, so they are not the base "
                f"model's; unfuse them first (pipe.unfuse_lora())")
        self.pipe = pipe
        self.model: torch.nn.Module = getattr(pipe, self.component)
        self.allow_pickle = allow_pickle
        self.text_encoder = text_encoder
        self.blender = Blender(self.model, mode, merge_cache=merge_cache)
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    @classmethod
    def from_pretrained(cls, model: str | Path, adapters: Mapping[str, str | Path] | None = None, *,
                        mode: str = "auto", allow_pickle: bool = False, text_encoder: str = "refuse",
                        merge_cache: bool = True, **pipe_kwargs: Any) -> BlendPipeline:
        """``DiffusionPipeline.from_pretrained(model, **pipe_kwargs)`` (a local directory here), then adapters.

        A folder saved by the embedded default's ``DigitsPipeline`` (not a diffusers class) loads too.
        """
        return cls(_pipeline_class(model).from_pretrained(model, **pipe_kwargs), adapters, mode=mode,
                   allow_pickle=allow_pickle, text_encoder=text_encoder, merge_cache=merge_cache)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters on the denoiser, in load order (a list of weights follows this order)."""
        self.blender.sync()  # adapters loaded or deleted through diffusers since
        return list(self.blender.adapter_names)

    @property
    def mode(self) -> str:
        return self.blender.mode

    @mode.setter
    def mode(self, value: str) -> None:
        resolve_mode(value)
        self.blender.mode = value

    def load_adapter(self, name: str, path: str | Path, *, allow_pickle: bool | None = None,
                     text_encoder: str | None = None) -> None:
        """Check and load one LoRA adapter under ``name`` (errors: :class:`AdapterError`)."""
        load_adapter(self.model, name, path, component=self.component,
                     allow_pickle=self.allow_pickle if allow_pickle is None else allow_pickle,
                     text_encoder=self.text_encoder if text_encoder is None else text_encoder,
                     pipeline_class=type(self.pipe))
        self.blender.refresh()

    # -- blending ------------------------------------------------------------------------------
    def make_blend(self, weights: Mapping[str, float] | Sequence[float] | Sequence[Mapping[str, float]] | None, *,
                   kl_strength: float | Sequence[float] = 1.0, method: str = "mpa", blend_seed: int = 0,
                   normalize: bool = False, sample_keys: Sequence[int] | None = None,
                   ls_draws: str = "iid") -> Blend | RowBlend | None:
        """Validate a blend over this pipeline's adapters (None weights: the base model; a list of
        per-image weights: a :class:`~.core.rows.RowBlend`, kl_strength then one value or one per image)."""
        if weights is None:
            return None
        if is_per_row(weights):
            if ls_draws != "iid":
                raise ValueError(f"ls_draws={ls_draws!r} is not available with per-image weights (a list of w); "
                                 f"use ls_draws='iid' or one call per w")
            return RowBlend.create(weights, self.adapter_names, kl_strength=kl_strength, method=method,
                                   seed=blend_seed, normalize=normalize, sample_keys=sample_keys)
        return Blend.create(weights, self.adapter_names, kl_strength=kl_strength, method=method, seed=blend_seed,
                            normalize=normalize, sample_keys=sample_keys, ls_draws=ls_draws)

    def denoiser(self, blend: Blend | None, **kwargs: Any) -> Denoiser:
        """:func:`blend_denoiser` over this pipeline's denoiser (for ``core.sample``)."""
        return blend_denoiser(self.model, blend, mode=kwargs.pop("mode", self.blender.mode), blender=self.blender,
                              **kwargs)

    def _validated(self, blend: Blend | None, mode: str | None, samples: int | None) -> str:
        """The one validation of a blend for a run (not repeated at every denoiser call): adapters
        synced, the blend checked against the model and mode, a per-image blend against the run's
        number of images. Returns the execution mode ("batched" / "sequential")."""
        self.blender.sync()  # adapters loaded, deleted or replaced through diffusers since
        run_mode = self.blender.resolve(blend, mode)
        self.blender.check(blend, run_mode)
        if samples is None and blend is not None and (blend.method == "ls" or isinstance(blend, RowBlend)):
            raise ValueError(
                f"method={blend.method!r}{' with per-image weights' if isinstance(blend, RowBlend) else ''} "
                f"blends each image on its own, so the call must declare how many images it makes: pass prompt "
                f"(a str or a list) or prompt_embeds (and num_images_per_prompt)")
        if isinstance(blend, RowBlend) and samples is not None:
            blend.check_samples(samples)
        return run_mode

    @contextlib.contextmanager
    def attached(self, blend: Blend | None, mode: str | None = None, *, samples: int | None = None
                 ) -> Iterator[None]:
        """Within the block, every call of the pipeline's denoiser runs as ``blend``.

        Args:
            samples: the number of images the run makes (``__call__`` reads it from the call:
                :func:`declared_samples`). A denoiser call of ``rows`` rows then holds
                G = rows / samples stacked copies of them (``[uncond; cond]`` under CFG, a third with
                PAG, one for SD3's skip-layer guidance call on the cond rows); ``rows`` must be a
                multiple. None: unknown, allowed for blends that treat every row alike (not LS, not
                per-image weights), which then run as one group.
        """
        run_mode = self._validated(blend, mode, samples)
        model = self.model
        had_own = "forward" in model.__dict__  # e.g. an accelerate offload hook's forward
        inner = model.forward
        run_blend: list[Blend | None] = []  # the blend on the run's step grid (stratified LS draws need it)

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = kwargs.get(self.blender._sample_arg, args[0] if args else None)
            groups = 1 if samples is None or not isinstance(x, torch.Tensor) else _groups(x.shape[0], samples)
            if not run_blend:  # the scheduler's timesteps are set by now (the pipeline's loop runs)
                t = self.blender._signature.bind_partial(*args, **kwargs).arguments.get("timestep")
                run_blend.append(_on_scheduler_grid(blend, self.pipe, t))
            return self.blender.forward(inner, run_blend[0], groups, args, kwargs, run_mode, checked=True)

        model.forward = forward
        try:
            yield
        finally:
            if had_own:
                model.forward = inner
            else:
                del model.forward

    def __call__(self, *args: Any, weights: Mapping[str, float] | Sequence[float] | Sequence[Mapping] | None = None,
                 kl_strength: float | Sequence[float] = 1.0, method: str = "mpa", blend_seed: int = 0,
                 normalize: bool = False, sample_keys: Sequence[int] | None = None, ls_draws: str = "iid",
                 mode: str | None = None, **pipe_kwargs: Any) -> Any:
        """Run the pipeline with its usual arguments, blending the adapters with w = ``weights``.

        Args:
            weights: w as ``{name: w_i}`` (missing names get 0) or a list in ``adapter_names`` order;
                must sum to 1 unless normalize=True. None: the plain base model. A list of per-image
                weights (``[{name: w_i}, ...]``, one per image: prompts x num_images_per_prompt, in the
                pipeline's image order) blends each image with its own w in one batched call, as a separate
                call would (:class:`~.core.rows.RowBlend`; soup runs one forward per distinct w).
            kl_strength: lambda >= 0 (1: DB-MPA; < 1 closer to the base; > 1 extrapolates, MPA only);
                with per-image weights, one lambda or a list of one per image.
            method: "mpa", "ls" or "soup".
            blend_seed: seed of the LS draws (per sample and step; the pipeline's generator is untouched).
            sample_keys: one integer per image (e.g. the seed of its generator) that keys its LS draws
                instead of its row in the batch, so an image draws the same adapters in any batch.
            ls_draws: "iid" (the paper's), "stratified" or "golden" (method "ls": every step's draw
                has the same law, each image's mix of adapters far less spread; the step grid is
                read from the pipeline's scheduler).
            mode: override the execution mode for this call.
            **pipe_kwargs: the pipeline's own arguments (prompt, num_inference_steps, guidance_scale,
                eta, generator, latents, output_type, callback_on_step_end, ...).

        Returns:
            the pipeline's own output.
        """
        self.blender.sync()  # adapters loaded, deleted or replaced through diffusers since
        check_call_kwargs(self.pipe, pipe_kwargs)
        eta = _eta(self.pipe, pipe_kwargs)
        if not 0.0 <= eta <= 1.0:  # diffusers' DDIM step takes any eta and returns NaN images above 1
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        blend = self.make_blend(weights, kl_strength=kl_strength, method=method, blend_seed=blend_seed,
                                normalize=normalize, sample_keys=sample_keys, ls_draws=ls_draws)
        samples = declared_samples(self.pipe, args, pipe_kwargs)
        if blend is not None and blend.method == "ls" and not _is_stochastic(self.pipe, pipe_kwargs):
            warnings.warn(
                f"method='ls' is exact in distribution only with a stochastic sampler (DDIM eta=1, DDPM; flow "
                f"matching: diffblend.schedulers.FlowMatchSDEScheduler, noise_level > 0); with "
                f"{type(getattr(self.pipe, 'scheduler', None)).__name__} (eta={_eta(self.pipe, pipe_kwargs)}) it "
                f"is a randomised heuristic", stacklevel=2)
        if not callable(self.pipe):
            raise TypeError(f"{type(self.pipe).__name__} is not callable: a BlendPipeline call runs its pipeline "
                            f"(without one, use attached() or denoiser())")
        with self.attached(blend, mode, samples=samples):  # validates the blend, once for the call
            return self.pipe(*args, **pipe_kwargs)
