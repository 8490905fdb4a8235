"""diffblend: Diffusion Blend, inference-time multi-preference alignment for diffusion models.

Cheng, Doudi, Kalathil, Ghavamzadeh, Kumar, ICLR 2026 (arXiv 2505.18547).
"""

from .core.blend import BASE, Blend

__version__ = "0.1.0"
__all__ = ["BASE", "Blend", "__version__"]
