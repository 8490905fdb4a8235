"""``diffblend generate --height/--width`` (checked against the family's latent grid) and the guidance scale
of a guidance-distilled Flux (its guidance input, as FluxPipeline's guidance_scale), on the tiny pipelines."""

from __future__ import annotations

import pytest
import torch
from helpers_pipelines import save_random_lora, tiny_flux, tiny_sd

from diffblend.cli import main
from diffblend.families import image_size_multiple
from diffblend.generation import check_image_size
from diffblend.model import DiffusionModel


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    pipe = tiny_flux()
    pipe.save_pretrained(folder)
    return folder, save_random_lora(pipe, folder.parent / "lora_a", seed=1)


def test_size_multiple_per_family(tmp_path):
    flux, sd = tiny_flux(), tiny_sd(tmp_path)
    assert flux.vae_scale_factor == sd.vae_scale_factor == 2  # the tiny VAE halves the size
    assert image_size_multiple(flux) == 4 and image_size_multiple(sd) == 2  # Flux: x2 for its 2x2 packing
    assert check_image_size(flux, 32, None) == {"height": 32} and check_image_size(sd, None, None) == {}
    with pytest.raises(ValueError, match="width must be a multiple of 4 for FluxPipeline.*got 18"):
        check_image_size(flux, 16, 18)
    with pytest.raises(ValueError, match="height must be a positive int"):
        check_image_size(sd, 0, 16)
    assert check_image_size(sd, 18, 6) == {"height": 18, "width": 6}


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_generate_on_a_flux_folder_at_a_chosen_size(flux_folder, tmp_path):
    folder, lora = flux_folder
    out = tmp_path / "g.png"
    args = ["generate", "--model", str(folder), "--adapter", f"a={lora}", "--weights", "a=1", "--prompt", "a",
            "--num-images", "1", "--steps", "1", "--no-scores", "--scale", "1", "--height", "24", "--width", "16",
            "-o", str(out)]
    assert main(args) == 0
    assert _png_size(out) == (16 + 2, 24 + 2)  # (W, H) plus the grid's 1-pixel border on each side


@pytest.mark.parametrize("flags, message", [
    (["--height", "18"], "--height must be a multiple of 4 for FluxPipeline"),
    (["--width", "-8"], "--width must be a positive number of pixels"),
    (["--guidance-scale", "4"], "--guidance-scale: this Flux transformer has no guidance input"),
])
def test_generate_refuses_bad_sizes_and_an_ignored_guidance_scale(flux_folder, tmp_path, capsys, flags, message):
    folder, _ = flux_folder
    rc = main(["generate", "--model", str(folder), "--prompt", "a", "--num-images", "1", "--steps", "1",
               "--no-scores", *flags, "-o", str(tmp_path / "g.png")])
    assert rc != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_distilled_flux_guidance_scale_is_its_guidance_input():
    """A guidance-distilled Flux: DiffusionModel.guide(s) feeds s to the transformer as FluxPipeline's
    guidance_scale does (one deterministic step and the decode equal the pipeline's own to 1e-4, float32
    round-off of the same ops in another order), and another s gives another image."""
    pipe = tiny_flux(guidance_embeds=True)
    model = DiffusionModel.from_pipeline(pipe)
    assert model.guidance_embed
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["ab", "c"]
    outs = {}
    for s in (1.5, 6.0):
        outs[s] = model.sample(model.guide(model.denoiser(), s), x.clone(), model.grid(2), model.encode(prompts),
                               0.0).sample
        ref = pipe(prompts, latents=x.clone(), output_type="latent", num_inference_steps=2, max_sequence_length=16,
                   guidance_scale=s).images
        torch.testing.assert_close(outs[s], ref, atol=1e-4, rtol=0)
    assert (outs[1.5] - outs[6.0]).abs().max() > 1e-3


def test_sweep_backend_on_a_distilled_flux_guides_through_its_input(tmp_path):
    """The sweep's backend on a guidance-distilled Flux: one pass per step (no [uncond; cond] rows, so an
    LS blend of one image runs), and its guidance scale changes the images."""
    from diffblend.evaluate.methods import Setting, generate
    from diffblend.evaluate.pipelines import DiffusersBackend

    pipe = tiny_flux(guidance_embeds=True)
    a, b = (save_random_lora(pipe, tmp_path / n, seed=i + 1) for i, n in enumerate("ab"))
    adapters = {"boldness": a, "jpeg_compressibility": b}
    x0 = {}
    for s in (1.0, 4.0):
        backend = DiffusersBackend(pipe, adapters, ["boldness"], num_steps=2, guidance_scale=s)
        x0[s] = generate(backend, Setting.make("ls", {"boldness": 0.5, "jpeg_compressibility": 0.5}), ["a"], [0]).x0
        backend.bp.pipe.transformer.delete_adapters(["boldness", "jpeg_compressibility"])
    assert x0[1.0].shape == (1, 16, 16) and (x0[1.0] - x0[4.0]).abs().max() > 1e-3
