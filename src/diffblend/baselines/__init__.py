"""Baselines the paper compares Diffusion Blend with: Rewarded Soup, reward-gradient guidance
(RGG) and controlled decoding (CoDe)."""
