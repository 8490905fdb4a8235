"""LoRA adapters on a diffusers UNet: add, disable (the frozen base), save and load.

The adapter is a peft LoRA on the attention projections ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` (the diffusers convention), added with ``unet.add_adapter``. It starts as the zero
update (peft initialises B = 0), so at step 0 the policy *is* the base model: the PPO ratio is 1
and the KL to the base is 0.

Files are diffusers LoRA safetensors, the format ``StableDiffusionPipeline.save_lora_weights``
writes and ``load_lora_weights`` reads: keys ``unet.<module>.lora_A.weight`` /
``unet.<module>.lora_B.weight`` and the peft LoraConfig in the ``lora_adapter_metadata`` header.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"  # peft's default adapter name, used by add_adapter / load_lora_weights

__all__ = [
    "LORA_TARGETS", "add_lora", "base_model", "lora_parameters", "lora_state_dict",
    "set_lora_state_dict", "save_lora", "load_lora_file",
]


def add_lora(unet: torch.nn.Module, rank: int = 4, lora_alpha: float | None = None,
             target_modules: Sequence[str] = LORA_TARGETS, generator: torch.Generator | None = None) -> None:
    """Freeze ``unet`` and add one trainable LoRA adapter of ``rank`` on ``target_modules``.

    Args:
        unet: a diffusers model with ``add_adapter`` (``PeftAdapterMixin``), e.g. UNet2DConditionModel.
        rank: r >= 1.
        lora_alpha: peft's lora_alpha (scale = lora_alpha / r); default r, scale 1.
        generator: draws the A matrices (kaiming-uniform, as peft) from this generator instead of
            the global RNG, so a seed fixes the initial adapter.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    alpha = float(rank if lora_alpha is None else lora_alpha)
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                    target_modules=list(target_modules)))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"target_modules {list(target_modules)} do not match the model: {exc}") from None
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_A." in name:  # same law as peft's init, but from our (CPU) generator
                a = torch.empty(p.shape, dtype=torch.float32)
                p.copy_(torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator))
    if not lora_parameters(unet):
        raise ValueError(f"no module of the model matches target_modules {list(target_modules)}")


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (the only ones with requires_grad)."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


@contextlib.contextmanager
def base_model(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``unet`` computes the frozen base (its adapters disabled).

    peft's disable toggles requires_grad of the LoRA weights off and back on, so this is for
    no-grad evaluation of eps_pre; the adapters are re-enabled even if the block raises.
    """
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as ``{<module>.lora_A.weight: tensor, ...}`` (peft keys without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def set_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`lora_state_dict` back into the adapter of ``unet`` (strict on the LoRA keys)."""
    from peft.utils import set_peft_model_state_dict

    expected = set(lora_state_dict(unet))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    set_peft_model_state_dict(unet, state)
    # set_peft_model_state_dict does not touch requires_grad; keep the adapter trainable
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)


def save_lora(unet: torch.nn.Module, path: str | os.PathLike, *, pipeline_class: type | None = None,
              component: str = "unet") -> Path:
    """Write the adapter of ``unet`` to ``path`` (a .safetensors file), atomically.

    Uses ``pipeline_class.save_lora_weights`` itself (default ``StableDiffusionPipeline``; into a
    temporary folder beside ``path``, then ``os.replace``), so the file is exactly what diffusers
    writes and that pipeline's ``load_lora_weights`` reads. ``component``: "unet" or "transformer"
    (the key prefix and the save_lora_weights arguments, e.g. ``transformer_lora_layers`` for SD3).
    """
    if component not in ("unet", "transformer"):
        raise ValueError(f"component must be 'unet' or 'transformer', got {component!r}")
    if pipeline_class is None or not hasattr(pipeline_class, "save_lora_weights"):
        from diffusers import StableDiffusionPipeline as pipeline_class

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[ADAPTER_NAME].to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=path.parent))
    try:
        pipeline_class.save_lora_weights(
            tmp, weight_name="adapter.safetensors", safe_serialization=True,
            **{f"{component}_lora_layers": lora_state_dict(unet), f"{component}_lora_adapter_metadata": config})
        written = tmp / "adapter.safetensors"
        umask = os.umask(0)  # read the umask (no other way) and put it back at once
        os.umask(umask)
        os.chmod(written, 0o666 & ~umask)  # a plain file's mode, not the private one of a temp file
        os.replace(written, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a saved adapter: (state dict without the ``unet.`` prefix, LoraConfig dict or {})."""
    import json

    from safetensors import safe_open

    state, meta = {}, {}
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        for k in f.keys():
            if not k.startswith("unet."):
                raise ValueError(f"{path}: key {k!r} is not a UNet LoRA key (expected 'unet.<module>.lora_A.weight')")
            state[k[len("unet."):]] = f.get_tensor(k)
    if "lora_adapter_metadata" in header:
        raw = json.loads(header["lora_adapter_metadata"])
        meta = {k[len("unet."):]: v for k, v in raw.items() if k.startswith("unet.")}
    return state, meta
