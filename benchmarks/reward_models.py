"""Time each model reward on its tiny test model: a batch of 8 images at 512x512 (median of 3, after a warm-up).

Run from the repository root: PYTHONPATH=src python benchmarks/reward_models.py
"""
import sys, time, tempfile, torch
sys.path.insert(0, "tests")
from pathlib import Path
torch.set_num_threads(1)
from helpers_rewards import tiny_clip, uint8_images, PROMPTS
from helpers_pipelines import _tokenizer
from diffblend.rewards import get_reward
import test_reward_clip as tc, test_reward_hps as th, test_reward_imagereward as ti
d = Path(tempfile.mkdtemp())
clip = tiny_clip(d / "clip"); tc._save_head(d / "head.pth", 16)
torch.save(th._openclip_state_dict(), d / "hps.pt"); _tokenizer().save_pretrained(d / "tok")
(d / "ir").mkdir(); (d / "ir" / "vocab.txt").write_text("\n".join(ti.WORDS) + "\n"); torch.save(ti._state_dict(), d / "ir" / "ImageReward.pt"); from transformers import BertTokenizer; BertTokenizer(str(d / "ir" / "vocab.txt")).save_pretrained(d / "ir")
x = uint8_images(8, 512, 512); prompts = (PROMPTS * 2)[:8]
from PIL import Image, ImageDraw, ImageFont
import numpy as np
im = Image.new("RGB", (512, 512), "white"); ImageDraw.Draw(im).text((40, 200), "HELLO", fill="black", font=ImageFont.load_default(size=80))
xo = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None].repeat(8, 1, 1, 1)
cases = {"clip_score": (dict(path=str(clip)), x), "pickscore": (dict(path=str(clip)), x),
         "aesthetic": (dict(path=str(clip), head=str(d / "head.pth")), x),
         "hpsv2": (dict(path=str(d / "hps.pt"), tokenizer=str(d / "tok"), head_width=16), x),
         "imagereward": (dict(path=str(d / "ir"), heads=(2, 3)), x), "ocr": ({}, xo)}
for name, (opts, imgs) in cases.items():
    fn = get_reward(name, **opts)
    p = ['a sign "hello"'] * 8 if name == "ocr" else prompts
    for grad in (False, True):
        ts = []
        for _ in range(1 if name == "ocr" else 3):
            xi = imgs.clone().requires_grad_(grad and name != "ocr")
            t = time.perf_counter()
            with torch.set_grad_enabled(grad):
                s, _ = fn(xi, p, None)
                if grad and s.requires_grad: s.sum().backward()
            ts.append(time.perf_counter() - t)
        if name == "ocr" and grad: continue
        print(f"{name:12s} {'fwd+bwd' if grad else 'no_grad'}: {sorted(ts)[len(ts)//2]:.3f} s per batch of 8 at 512x512")
