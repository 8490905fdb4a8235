"""The colour default model's pieces: scene generator, prompts, attribute classifier, its rewards."""

import math
import statistics

import pytest
import torch

from diffblend.rewards import get_reward
from diffblend.zoo.colour import data as D
from diffblend.zoo.colour.classifier import (AttributeClassifier, load_attribute_classifier,
                                             save_attribute_classifier)


def _scene(**names):
    return {k: torch.tensor([D.ATTRIBUTES[k].index(v)]) for k, v in names.items()}


def test_render_is_deterministic_and_in_range():
    a = D.sample_attributes(8, torch.Generator().manual_seed(1))
    x1 = D.render(a, torch.Generator().manual_seed(2))
    x2 = D.render(a, torch.Generator().manual_seed(2))
    assert x1.shape == (8, 3, 32, 32) and torch.equal(x1, x2)
    assert float(x1.min()) >= 0 and float(x1.max()) <= 1
    assert all(D.COLOURS[c] != D.BACKGROUNDS[b] for c, b in zip(a["colour"], a["background"]))


def _saturation_of(pixel: torch.Tensor, name: str) -> float:
    """s with pixel = grey + s (colour - grey), grey the colour's mean; asserts the pixel is on that line."""
    c = torch.tensor(D.RGB[name])
    grey = c.mean()
    s = float(((pixel - grey) * (c - grey)).sum() / ((c - grey) ** 2).sum())
    assert torch.allclose(pixel, grey + s * (c - grey), atol=1e-5), (pixel, name)
    return s


def test_render_puts_the_colours_where_they_belong():
    x = D.render(_scene(shape="square", colour="red", size="large", pattern="plain", background="blue"),
                 torch.Generator().manual_seed(0))[0]
    lo, hi = D.SATURATION
    assert lo - 1e-6 <= _saturation_of(x[:, 16, 16], "red") <= hi + 1e-6  # centre: the shape
    assert lo - 1e-6 <= _saturation_of(x[:, 0, 0], "blue") <= hi + 1e-6  # corner: the background
    small = D.render(_scene(shape="square", colour="red", size="small", pattern="plain", background="blue"),
                     torch.Generator().manual_seed(0))[0]
    shape = lambda img: float(((img - img[:, 16, 16][:, None, None]).abs().sum(0) < 1e-4).float().mean())
    assert shape(small) < 0.5 * shape(x)


def test_what_the_prompt_does_not_name_varies_between_its_images():
    """One prompt, 64 images: the shape's and the background's saturation spread over SATURATION, the
    pattern's second tone over DARK; white stays white (saturation does not change a grey)."""
    n = 64
    scene = {k: v.repeat(n) for k, v in _scene(shape="square", colour="red", size="large", pattern="striped",
                                                background="blue").items()}
    x = D.render(scene, torch.Generator().manual_seed(0))
    s_shape = torch.tensor([_saturation_of(img[:, 16, 16], "red") for img in x])
    s_back = torch.tensor([_saturation_of(img[:, :, 0].max(1).values, "blue") for img in x])  # the light tone
    for s in (s_shape, s_back):
        assert s.min() >= D.SATURATION[0] - 1e-5 and s.max() <= D.SATURATION[1] + 1e-5
        assert s.max() - s.min() > 0.8 * (D.SATURATION[1] - D.SATURATION[0])
    edges = torch.cat([x[:, 2, 0, :], x[:, 2, :, 0]], 1)  # blue channel of the top row and left column: both tones
    dark = edges.amin(1) / edges.amax(1)  # second tone / first
    assert dark.min() >= D.DARK[0] - 1e-5 and dark.max() <= D.DARK[1] + 1e-5
    white = D.render(_scene(shape="circle", colour="white", size="large", pattern="plain", background="black"),
                     torch.Generator().manual_seed(1))[0]
    assert torch.allclose(white[:, 16, 16], torch.tensor(D.RGB["white"]), atol=1e-6)


@pytest.mark.parametrize("pattern,changes", [("plain", False), ("striped", True), ("checkered", True)])
def test_patterned_backgrounds_alternate_two_tones(pattern, changes):
    x = D.render(_scene(shape="circle", colour="white", size="small", pattern=pattern, background="green"),
                 torch.Generator().manual_seed(0))[0]
    border = torch.cat([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], 1)  # far from the shape
    assert (border.std(1).max() > 0.05) == changes


def test_prompts_round_trip():
    g = torch.Generator().manual_seed(3)
    a = D.sample_attributes(20, g)
    for i in range(20):
        scene = {k: int(a[k][i]) for k in D.ATTRIBUTES}
        assert D.parse_prompt(D.prompt_for(scene)) == scene
        assert D.parse_prompt(D.prompt_for(scene, ["shape", "colour"])) == {k: scene[k] for k in ("shape", "colour")}
    assert D.prompt_for(_scene(shape="circle", colour="orange")) == "an orange circle"
    assert D.parse_prompt("a small red triangle on a striped blue background") == {
        "size": 0, "colour": 0, "shape": 2, "pattern": 1, "background": 5}
    assert set(D.vocabulary_words()) >= set("a small red triangle on striped blue background".split())


@pytest.mark.parametrize("bad", ["", "a red", "a red dog", "7", "a circle on a striped background now"])
def test_parse_prompt_rejects_other_text(bad):
    with pytest.raises(ValueError, match="colour-scene prompt"):
        D.parse_prompt(bad)


def test_tokenizer_gives_one_token_per_word():
    from diffblend.zoo.colour.model import MAX_LENGTH
    from diffblend.zoo.text import build_tokenizer

    tok = build_tokenizer(D.vocabulary_words(), MAX_LENGTH)
    ids = tok("a small red triangle on a striped blue background").input_ids
    assert len(ids) == 9 + 2 and len(ids) <= MAX_LENGTH
    # every word alone is one token: "plain" and "purple" were split by merges of earlier words ("la" of
    # "large"), which made their prompts 14 tokens, cut at 12
    split = {w: tok.convert_ids_to_tokens(tok(w).input_ids) for w in D.vocabulary_words() if len(tok(w).input_ids) != 3}
    assert split == {}
    longest = "a large purple diamond on a checkered purple background"
    assert len(tok(longest).input_ids) == 11


def test_digits_tokenizer_is_unchanged_by_the_merge_repair():
    from transformers import CLIPTokenizer

    from diffblend.zoo import weights_dir
    from diffblend.zoo.text import build_tokenizer

    shipped = CLIPTokenizer.from_pretrained(str(weights_dir("base") / "tokenizer"))
    assert build_tokenizer().get_vocab() == shipped.get_vocab()


def test_colourfulness_matches_the_formula_by_hand():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 3, 2)
    got = get_reward("colourfulness")(img, ["", ""])[0]
    for b in range(2):
        px = [(255 * float(img[b, 0].flatten()[i]), 255 * float(img[b, 1].flatten()[i]),
               255 * float(img[b, 2].flatten()[i])) for i in range(6)]
        rg = [r - g for r, g, _ in px]
        yb = [(r + g) / 2 - bl for r, g, bl in px]
        m = math.hypot(statistics.pstdev(rg), statistics.pstdev(yb)) + 0.3 * math.hypot(
            statistics.fmean(rg), statistics.fmean(yb))
        assert float(got[b]) == pytest.approx(m, rel=1e-5)  # float32 sums over 6 pixels
    grey = torch.full((1, 3, 4, 4), 0.4)
    assert float(get_reward("colorfulness")(grey, [""])[0]) == pytest.approx(0.0, abs=1e-4)
    assert float(get_reward("colourfulness")(torch.rand(1, 1, 4, 4), [""])[0]) == 0.0
    with pytest.raises(ValueError, match="RGB"):
        get_reward("colourfulness")(torch.rand(1, 2, 4, 4), [""])


def test_rms_contrast_matches_pil_luma_by_hand():
    """The sd of the luma PIL's convert("L") computes (BT.601, rounded to 8 bits: 1/255 tolerance)."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    img = torch.rand(2, 3, 5, 4)
    got = get_reward("rms_contrast")(img, ["", ""])[0]
    for b in range(2):
        rgb = (img[b].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        y = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64) / 255
        assert float(got[b]) == pytest.approx(float(y.std()), abs=2 / 255)
    flat = torch.full((1, 3, 4, 4), 0.7)
    assert float(get_reward("contrast")(flat, [""])[0]) == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2] = 1.0  # half black, half white: the largest contrast
    assert float(get_reward("rms_contrast")(half, [""])[0]) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        get_reward("rms_contrast")(torch.rand(1, 2, 4, 4), [""])


def test_jpeg_compressibility_handles_rgb():
    plain = D.render(_scene(shape="circle", colour="red", size="small", pattern="plain", background="black"),
                     torch.Generator().manual_seed(0))
    checks = D.render(_scene(shape="circle", colour="red", size="small", pattern="checkered", background="yellow"),
                      torch.Generator().manual_seed(0))
    scores, info = get_reward("jpeg_compressibility")(torch.cat([plain, checks]), ["", ""])
    assert scores.shape == (2,) and float(scores[0]) > float(scores[1])  # the plain scene is smaller


def test_prompt_alignment_matches_the_classifier_by_hand(tmp_path):
    torch.manual_seed(0)
    clf = AttributeClassifier(width=4).eval()
    save_attribute_classifier(clf, tmp_path)
    assert torch.equal(load_attribute_classifier(tmp_path).heads["shape"].weight, clf.heads["shape"].weight)
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a small red triangle on a striped blue background", "a green circle"]
    scores, info = get_reward("prompt_alignment", path=str(tmp_path))(images, prompts)
    with torch.no_grad():
        logits = clf(images)
    want0 = sum(float(torch.log_softmax(logits[k][0], 0)[i]) for k, i in D.parse_prompt(prompts[0]).items())
    want1 = float(torch.log_softmax(logits["shape"][1], 0)[0] + torch.log_softmax(logits["colour"][1], 0)[1])
    assert scores.tolist() == pytest.approx([want0, want1], abs=1e-5)
    assert math.isnan(float(info["prob_size"][1])) and not math.isnan(float(info["prob_size"][0]))
    with pytest.raises(ValueError, match="one prompt per image"):
        get_reward("prompt_alignment", path=str(tmp_path))(images, prompts[:1])


def test_colour_pipeline_saves_loads_and_generates_rgb(tmp_path):
    from diffblend.zoo.colour.measure import generate_images, heldout_prompts, measure
    from diffblend.zoo.colour.model import build_pipeline
    from diffblend.zoo.generate import load_pipeline

    pipe = build_pipeline(seed=0, channels=(8, 8, 8))
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "pipe"))  # a DigitsPipeline folder: the generic path loads it
    assert type(loaded).__name__ == "DigitsPipeline" and loaded.unet.config.in_channels == 3
    pil = loaded("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.mode == "RGB" and pil.size == (32, 32)
    prompts = heldout_prompts(4)
    images = generate_images(loaded, prompts, steps=2, seed=0)
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images, generate_images(loaded, prompts, steps=2, seed=0))  # seeded per image
    save_attribute_classifier(AttributeClassifier(width=4), tmp_path / "clf")
    out = measure(images, prompts, str(tmp_path / "clf"))
    assert set(out["rewards"]) == {"prompt_alignment", "colourfulness", "jpeg_compressibility"}
    assert 0 <= out["prompt_accuracy_all"] <= 1 and len(out["pearson"]) == 3


def test_train_colour_runs_resumes_and_exports(tmp_path):
    from diffblend.zoo.colour.train import ColourTrainConfig, export_checkpoint, train_colour

    cfg = ColourTrainConfig(steps=2, batch_size=2, channels=(8, 8, 8), log_every=1, checkpoint_every=1)
    s = train_colour(cfg, tmp_path / "run", progress=False)
    assert s["steps"] == 2 and math.isfinite(s["final_loss"])
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    cfg.steps = 3
    assert train_colour(cfg, tmp_path / "run", resume=True, progress=False)["steps"] == 3
    assert export_checkpoint(tmp_path / "run", tmp_path / "exported") == 3
    from diffblend.zoo.generate import load_pipeline

    a, b = load_pipeline(str(tmp_path / "run" / "pipeline")), load_pipeline(str(tmp_path / "exported"))
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_colour_diffusion_loss_matches_the_formula_by_hand(prediction_type):
    from diffblend.zoo.colour.model import build_pipeline
    from diffblend.zoo.colour.train import diffusion_loss

    pipe = build_pipeline(channels=(8, 8, 8), prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.randn(3, 3, 32, 32, generator=g)
    t, prompts = torch.tensor([0, 500, 999]), ["a red circle", "a small blue square", ""]
    ab = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        emb = pipe.text_encoder(pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                               return_tensors="pt").input_ids)[0]
        pred = pipe.unet(x_t, t, encoder_hidden_states=emb).sample
        loss = diffusion_loss(pipe, x0, prompts, t, noise)
    eps_err = (pred - noise).pow(2).mean((1, 2, 3))
    if prediction_type == "epsilon":
        assert float(loss) == pytest.approx(float(eps_err.mean()), rel=1e-5)
    else:  # v = sqrt(ab) eps - sqrt(1 - ab) x0; the v loss is the epsilon error of the implied eps, / ab
        v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        assert float(loss) == pytest.approx(float((pred - v).pow(2).mean()), rel=1e-5)
        eps_hat = (1 - ab).sqrt() * x_t + ab.sqrt() * pred
        implied = (eps_hat - noise).pow(2).mean((1, 2, 3)) / ab.flatten()
        assert float(loss) == pytest.approx(float(implied.mean()), rel=1e-4)


def test_colour_rewards_resolve_by_name_but_stay_out_of_the_digits_default_list():
    from diffblend.rewards import available_rewards, reward_info

    assert not {"colourfulness", "rms_contrast", "prompt_alignment"} & set(available_rewards())
    assert {"colourfulness", "rms_contrast", "prompt_alignment"} <= set(available_rewards(include_unlisted=True))
    assert "colourfulness" in reward_info()


def test_colour_schedules():
    from diffusers import DDIMScheduler

    from diffblend.zoo.colour.model import colour_scheduler_config

    ab = lambda s: float(DDIMScheduler(**colour_scheduler_config(s)).alphas_cumprod[-1])
    assert ab("linear") == pytest.approx(4.0e-5, rel=0.05)  # the digits' schedule
    assert ab("scaled_linear") == pytest.approx(0.0047, rel=0.05)  # SD's
    assert colour_scheduler_config()["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="schedule must be"):
        colour_scheduler_config("cosine")
    with pytest.raises(ValueError, match="prediction_type must be"):
        colour_scheduler_config("linear", "sample")
