"""The shipped adapters (zoo/adapters): listed in the manifest, diffusers LoRA files that fit the shipped base."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

FOLDER = Path(str(resources.files("diffblend.zoo").joinpath("adapters")))
MANIFEST = FOLDER / "manifest.json"


def _entries():
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text())["adapters"]


def test_manifest_names_registered_rewards_and_probability_weights():
    from diffblend.rewards import canonical_name
    from diffblend.train import parse_reward_spec

    entries = _entries()
    if not entries:
        pytest.skip("no adapters shipped yet")
    for name, e in entries.items():
        w = parse_reward_spec(e["reward"])  # also checks that weights sum to 1
        for r in w:
            canonical_name(r)
        if "weights" in e:
            assert e["weights"] == w, name
        assert e["kl"] > 0 and e["rank"] >= 1


@pytest.mark.parametrize("name", sorted(_entries()))
def test_shipped_adapter_fits_the_shipped_base(name):
    from diffblend.train import add_lora, load_lora_file, set_lora_state_dict, unet_denoiser
    from diffblend.zoo import load_default_pipeline

    entry = _entries()[name]
    path = FOLDER / entry["file"]
    if not path.is_file():
        pytest.skip(f"{entry['file']} not made yet")
    state, meta = load_lora_file(path)
    assert meta["r"] == entry["rank"] and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    unet = load_default_pipeline().unet
    add_lora(unet, entry["rank"])
    set_lora_state_dict(unet, state)  # strict: the same modules and shapes
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([500, 500]), torch.zeros(2, 1, unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.isfinite(unet_denoiser(unet)(x, t, c)).all()
