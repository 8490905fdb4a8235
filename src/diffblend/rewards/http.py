"""``http``: a reward served by another process (e.g. a model that needs its own environment).

Protocol (JSON over one HTTP POST per call, UTF-8):

    request  {"images": [B base64 PNG strings, 8-bit RGB, the (B, 3, H, W) batch rounded to uint8],
              "prompts": [B strings], "metadata": null | {...} | [B {...}]}
    response {"scores": [B numbers, higher is better], "info": {optional, returned as is}}

Any status other than 200, a body that is not such JSON, or a score count that is not B is an error.
By default only loopback hosts (127.0.0.1, ::1, localhost) are allowed: the images go to another
program on this machine. ``allow_remote=True`` lifts that.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch

from ._preprocess import batch_prompts, check_images, to_pil
from .registry import register_reward

__all__ = ["http_reward", "encode_images", "decode_image"]

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def encode_images(images: torch.Tensor) -> list[str]:
    """(B, 3, H, W) in [0, 1] -> B base64 PNG strings (8-bit RGB)."""
    out = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_image(text: str) -> Any:
    """One base64 PNG string -> a PIL RGB image (for servers written in Python)."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def _check_url(url: Any, allow_remote: bool) -> str:
    parsed = urlparse(str(url or ""))
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"http reward needs url=http://127.0.0.1:PORT/PATH, got {url!r}")
    if not allow_remote and parsed.hostname not in _LOOPBACK:
        raise ValueError(f"http reward url {url!r} is not a loopback address (127.0.0.1, ::1, localhost); "
                         f"pass allow_remote=True to send images to another machine")
    return str(url)


def _post(url: str, body: dict, timeout: float) -> dict:
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    req = Request(url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"})
    try:
        with urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except HTTPError as exc:
        raise ConnectionError(f"http reward at {url}: status {exc.code} {exc.reason}") from exc
    except (URLError, TimeoutError, ConnectionError) as exc:
        raise ConnectionError(f"http reward at {url}: no answer ({getattr(exc, 'reason', exc)}); "
                              f"is the reward server running?") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"http reward at {url}: the response is not JSON ({exc})") from exc


@register_reward("http", "a reward served by another process: images and prompts POSTed as JSON to url=..., "
                         "scores back (range and direction: the server's); not differentiable", needs_model=True)
def http_reward(device: str | torch.device = "cpu", url: str | None = None, timeout: float = 60.0,
                allow_remote: bool = False, path: str | None = None) -> Any:
    """A reward computed by a server at ``url`` (see the module docstring for the JSON protocol).

    ``timeout``: seconds to wait for each answer. ``path``: the folder when built from a
    ``reward.json`` (``{"factory": "http", "options": {"url": ...}}``); not used otherwise. Scores come
    back as float32 on the images' device, detached (not differentiable). ``info``: the server's.
    """
    url = _check_url(url, allow_remote)
    if not float(timeout) > 0:
        raise ValueError(f"http reward timeout must be > 0 seconds, got {timeout}")

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        b = check_images(images).shape[0]
        body = {"images": encode_images(images), "prompts": batch_prompts(prompts, b, "http reward"),
                "metadata": metadata}
        reply = _post(url, body, float(timeout))
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != b:
            raise ValueError(f"http reward at {url} must answer {{\"scores\": [{b} numbers]}}, got {str(reply)[:200]}")
        return torch.tensor(scores, dtype=torch.float32).to(images.device), dict(reply.get("info") or {})

    return fn
