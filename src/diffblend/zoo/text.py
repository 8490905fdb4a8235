"""The tiny text side of the default model: a CLIP BPE tokenizer over a small vocabulary and a
CLIP text encoder built from a small config (the same classes as Stable Diffusion's, no download).

The vocabulary holds the 256 byte-level symbols (alone and word-final), CLIP's special tokens, and
one whole-word token for every word of the prompt templates (``data.vocabulary_words``), so the
known prompts tokenize to one token per word and any other text still tokenizes (byte by byte).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import vocabulary_words

MAX_LENGTH = 12  # tokens per prompt incl. <|startoftext|> / <|endoftext|>; templates use <= 5
HIDDEN = 32  # text embedding width = the UNet's cross_attention_dim

__all__ = ["MAX_LENGTH", "HIDDEN", "build_tokenizer", "build_text_encoder", "text_encoder_config", "clip_tokenizer",
           "write_vocab_files", "portable_text_encoder_file"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: byte -> printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP applies it: merge the adjacent pair of lowest rank until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab and merges in which every word of ``words`` is one token.

    Each word's merges run left to right (d+i, di+g, dig+i, digi+t</w>). A merge of an earlier word can
    apply first inside a later one ("la" of "large" inside "plain"), leaving it in pieces; such a word gets
    the merges of the pieces it is actually split into, until it is one token (checked with :func:`_bpe`)."""
    vocab: dict[str, int] = {}
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    chars = list(_bytes_to_unicode().values())
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> None:
        if (left, right) not in merges:
            merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    words = [w for w in (vocabulary_words() if words is None else words) if len(w) >= 2]
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:  # merge left to right: d+i, di+g, dig+i, digi+t</w>
            add(left, right)
            left = left + right
    for word in words:
        ranks = {pair: i for i, pair in enumerate(merges)}
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # join the pieces left to right with merges of their own (ranked last)
            add(pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return vocab, merges


def write_vocab_files(folder: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` and ``merges.txt`` in CLIP's layout (what transformers 4.x's CLIPTokenizer reads)."""
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> Any:
    """A ``transformers.CLIPTokenizer`` over ``vocab`` / ``merges`` on transformers 4.x and 5.x alike.

    5.x builds it from the objects; 4.x's (slow) CLIPTokenizer only reads ``vocab.json`` / ``merges.txt``
    files, so they are written to a temporary folder first (it keeps the vocabulary in memory).
    """
    import inspect
    import tempfile

    from transformers import CLIPTokenizer

    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(tmp, vocab, merges)
        return CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                             model_max_length=model_max_length)


def build_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH) -> Any:
    """A ``transformers.CLIPTokenizer`` over the small vocabulary (the digits' words, or ``words``: one
    whole-word token each), ``model_max_length`` = ``max_length``."""
    vocab, merges = _vocab_and_merges(words)
    return clip_tokenizer(vocab, merges, max_length)


def text_encoder_config(vocab_size: int, hidden: int = HIDDEN, max_length: int = MAX_LENGTH) -> dict:
    """Config of the tiny ``CLIPTextModel`` (2 layers, width ``hidden``, 32 for the digits)."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def portable_text_encoder_file(folder: str | Path) -> None:
    """Rewrite a saved CLIPTextModel's ``model.safetensors`` with the ``text_model.`` key prefix.

    transformers 5 saves the keys without it and reads both; transformers 4.x only reads the prefixed keys
    and, on the others, silently starts from random weights. With the prefix the file loads the same on both.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .._io import atomic_write

    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(path))
    if all(k.startswith("text_model.") for k in sd):
        return
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def build_text_encoder(vocab_size: int, seed: int = 0, **config: Any) -> Any:
    """A freshly initialised tiny ``transformers.CLIPTextModel`` (weights from ``seed``); ``config``:
    ``hidden`` / ``max_length`` of :func:`text_encoder_config`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # initialisation uses the global RNG; keep it unchanged
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**text_encoder_config(vocab_size, **config)))
