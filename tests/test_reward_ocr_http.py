"""ocr on rendered text (RapidOCR runs for real: its wheel ships the models) and http against a stub server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from diffblend.rewards import get_reward
from diffblend.rewards.http import decode_image
from diffblend.rewards.ocr import edit_distance, ocr_similarity


def _render(text: str, size=(320, 128)) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((16, 36), text, fill="black", font=ImageFont.load_default(size=48))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def test_edit_distance_and_similarity_by_hand():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert ocr_similarity("Hello World", "helloworld") == 1.0
    assert ocr_similarity("a sign: OPEN now", "open") == 1.0  # contained: 1, as in Flow-GRPO
    assert ocr_similarity("opan", "open") == pytest.approx(0.75)
    assert ocr_similarity("", "open") == 0.0 and ocr_similarity("xxxxxxxxxxxx", "open") == 0.0  # clipped at len


def test_ocr_reads_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime")
    x = torch.stack([_render("HELLO"), _render("QUIZ BOX")])
    fn = get_reward("ocr")
    right, info = fn(x, ['a sign that says "hello"', 'a poster with "quiz box"'], None)
    wrong, _ = fn(x, ['a sign that says "garden"', 'text: "moonlight"'], None)
    assert right.dtype == torch.float32 and right.shape == (2,)
    assert (right >= 0.9).all(), (right, info["text"])
    assert (wrong <= 0.4).all() and (right - wrong >= 0.5).all(), (wrong, info["text"])
    meta, _ = fn(x[:1], ["no quotes here"], [{"text": "hello"}])
    assert meta.item() >= 0.9


def test_ocr_not_differentiable_and_errors():
    pytest.importorskip("rapidocr_onnxruntime")
    fn = get_reward("ocr")
    x = _render("HELLO")[None].requires_grad_(True)
    s, _ = fn(x, ['"hello"'], None)
    assert not s.requires_grad  # detached by design: documented, and RGG treats it as a zero gradient
    with pytest.raises(ValueError, match="double quotes"):
        fn(x, ["a sign without quoted text"], None)


class _Stub(BaseHTTPRequestHandler):
    """Score = mean grey level of the decoded PNG / 255 + number of characters of the prompt."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/broken":
            reply = {"scores": [1.0]}
        else:
            reply = {"scores": [float(np.asarray(decode_image(im)).mean() / 255 + len(p))
                                for im, p in zip(body["images"], body["prompts"])], "info": {"n": len(body["images"])}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopper = threading.Timer(60.0, server.shutdown)  # bounded even if the test never returns
    stopper.daemon = True
    stopper.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stopper.cancel()
    server.shutdown()
    server.server_close()


def test_http_against_stub_server(stub_url, tmp_path):
    x = (torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    prompts = ["a", "bb", "ccc"]
    scores, info = get_reward("http", url=stub_url + "/score")(x, prompts, None)
    expected = x.mean(dim=(1, 2, 3)) + torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)  # PNG is lossless on uint8-exact images
    assert info == {"n": 3}
    (tmp_path / "reward.json").write_text(json.dumps({"factory": "http", "options": {"url": stub_url}}))
    via_folder, _ = get_reward(str(tmp_path))(x, prompts, None)
    torch.testing.assert_close(via_folder, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"must answer \{\"scores\": \[3 numbers\]\}"):
        get_reward("http", url=stub_url + "/broken")(x, prompts, None)


def test_http_clear_errors():
    with pytest.raises(ValueError, match="url="):
        get_reward("http")
    with pytest.raises(ValueError, match="not a loopback"):
        get_reward("http", url="http://example.org/score")
    with socket_free_port() as port:
        fn = get_reward("http", url=f"http://127.0.0.1:{port}/", timeout=5)
    with pytest.raises(ConnectionError, match="is the reward server running"):
        fn(torch.rand(1, 3, 8, 8), ["a"], None)


class socket_free_port:  # noqa: N801 (a context manager used like a function)
    """A port nobody listens on: bound, read, released."""

    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc):
        self.s.close()
