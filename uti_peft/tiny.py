"""Locally built stand-ins for the real thing: a token space shaped like our users' and a tiny Qwen3.

Used by ``uti-peft demo``, the benchmarks and the tests, so that nothing needs a download. The token
space keeps the real layout (10 named specials in a 64-id SPECIAL block, an IMAGE block, four
interleaved audio codebooks) with sizes you choose; the tiny model's text tokenizer is a small
byte-level BPE built like Qwen3's (`uti_peft.tiny_tokenizer.build_tiny_tokenizer`, re-exported here).
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny_tokenizer import build_tiny_tokenizer
from .token_space import TokenSpace

__all__ = ["build_tiny_qwen3", "build_tiny_tokenizer", "build_token_space", "tiny_token_space"]

SPECIAL_TOKENS = (
    "<|text_start|>",
    "<|text_end|>",
    "<|img_start|>",
    "<|img_end|>",
    "<|aud_start|>",
    "<|aud_end|>",
    "<|gen_text|>",
    "<|gen_img|>",
    "<|gen_aud|>",
    "<|pad_mm|>",
)

# The real Stage-3 layout on Qwen/Qwen3-8B-Base.
QWEN3_8B_TEXT_VOCAB = 151_669
QWEN3_8B_EMBEDDING_ROWS = 151_936


def build_token_space(
    text_vocab_size: int,
    *,
    special_size: int = 64,
    image_size: int = 8192,
    n_codebooks: int = 4,
    codebook_size: int = 1024,
    base_text_model: str = "Qwen/Qwen3-8B-Base",
) -> TokenSpace:
    """A token space with the real layout; the defaults reproduce the real sizes (total 164,021)."""
    ranges: dict[str, dict[str, int]] = {}
    start = 0

    def add(name: str, size: int) -> None:
        nonlocal start
        ranges[name] = {"start": start, "end": start + size - 1, "size": size}
        start += size

    add("TEXT", text_vocab_size)
    add("SPECIAL", special_size)
    add("IMAGE", image_size)
    for codebook in range(n_codebooks):
        add(f"AUDIO_CB{codebook}", codebook_size)
    data: dict[str, Any] = {
        "version": "uti_v1",
        "created_utc": "2026-01-25T19:05:55Z",
        "base_text_model": base_text_model,
        "text_vocab_size": text_vocab_size,
        "special_tokens": {token: text_vocab_size + i for i, token in enumerate(SPECIAL_TOKENS)},
        "ranges": ranges,
        "image_tokenizer": {"name_or_path": "AILab-CVC/seed-tokenizer-2", "codebook_size": image_size},
        "audio_codec": {
            "name_or_path": "facebook/encodec_48khz",
            "n_codebooks": n_codebooks,
            "codebook_size": codebook_size,
            "serialization": "flatten_by_time_interleaved_codebooks",
        },
        "vocab_size_total": start,
    }
    return TokenSpace(data)


def tiny_token_space() -> TokenSpace:
    """The embedded default: 1,000 text ids, 64 specials, 256 image codes, 4 x 64 audio codes."""
    return build_token_space(1000, image_size=256, codebook_size=64, base_text_model="uti-peft/tiny-qwen3")


def build_tiny_qwen3(
    *,
    vocab_rows: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A randomly initialised Qwen3ForCausalLM small enough for a unit test, built without a download."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # cast parameters only: buffers (rotary inv_freq) stay float32, exactly as from_pretrained(dtype=...) leaves them
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype
    model.eval()
    return model
