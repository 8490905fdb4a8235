"""diffblend: Diffusion Blend, inference-time multi-preference alignment for diffusion models.

Cheng, Doudi, Kalathil, Ghavamzadeh, Kumar, ICLR 2026 (arXiv 2505.18547).

``import diffblend`` stays light (torch only); ``diffblend.BlendPipeline`` imports diffusers on first use.
"""

from typing import Any

from .core.blend import BASE, Blend

__version__ = "0.1.0"
__all__ = ["BASE", "Blend", "BlendPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "BlendPipeline":
        from .pipeline import BlendPipeline

        return BlendPipeline
    raise AttributeError(f"module 'diffblend' has no attribute {name!r}")
