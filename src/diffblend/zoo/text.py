"""The tiny text side of the default model: a CLIP BPE tokenizer over a small vocabulary and a
CLIP text encoder built from a small config (the same classes as Stable Diffusion's, no download).

The vocabulary holds the 256 byte-level symbols (alone and word-final), CLIP's special tokens, and
one whole-word token for every word of the prompt templates (``data.vocabulary_words``), so the
known prompts tokenize to one token per word and any other text still tokenizes (byte by byte).
"""

from __future__ import annotations

from typing import Any

from .data import vocabulary_words

MAX_LENGTH = 12  # tokens per prompt incl. <|startoftext|> / <|endoftext|>; templates use <= 5
HIDDEN = 32  # text embedding width = the UNet's cross_attention_dim

__all__ = ["MAX_LENGTH", "HIDDEN", "build_tokenizer", "build_text_encoder", "text_encoder_config"]


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


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    chars = list(_bytes_to_unicode().values())
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words():
        if len(word) < 2:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:  # merge left to right: d+i, di+g, dig+i, digi+t</w>
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


def build_tokenizer() -> Any:
    """A ``transformers.CLIPTokenizer`` over the small vocabulary, ``model_max_length`` = MAX_LENGTH."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def text_encoder_config(vocab_size: int) -> dict:
    """Config of the tiny ``CLIPTextModel`` (2 layers, width 32)."""
    return dict(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def build_text_encoder(vocab_size: int, seed: int = 0) -> Any:
    """A freshly initialised tiny ``transformers.CLIPTextModel`` (weights from ``seed``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # initialisation uses the global RNG; keep it unchanged
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**text_encoder_config(vocab_size)))
