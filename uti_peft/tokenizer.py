"""Give a text tokenizer a name for every new row of the token space.

The base tokenizer knows ids ``0..text_vocab_size-1`` only; the new rows (specials, image codes,
audio codes) are added as special tokens at exactly their token-space ids, so a mixed sequence decodes
readably and ``len(tokenizer) == vocab_size``, and the token space's pad (``<|pad_mm|>``) becomes the tokenizer's pad
token, as it is the model config's ``pad_token_id`` (engines that read the pad id from the tokenizer, such as
llama.cpp's GGUF converter, then agree with transformers). Names (one per id, in id order):

* named special tokens keep their name (``<|img_start|>``, ``<|pad_mm|>``, ...);
* image codes are ``<|img_{code}|>`` and audio codes ``<|aud{codebook}_{code}|>``;
* other ids of any other range, e.g. the unused SPECIAL ids, are ``<|{modality}_{offset}|>`` with the
  offset from the modality's first id (``<|special_10|>``); ids in no range are ``<|unused_{id}|>``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from transformers import AddedToken

from .token_space import TokenSpace

# Files any transformers tokenizer is saved with (at least one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Short names used in the existing special tokens (<|img_start|>, <|aud_start|>).
_ABBREVIATIONS = {"image": "img", "audio": "aud"}


def modality_token_names(token_space: TokenSpace) -> list[str]:
    """Names of ids ``text_vocab_size..vocab_size-1``, in id order."""
    specials = {token_id: name for name, token_id in token_space.special_tokens.items()}
    return [
        specials.get(token_id) or _generated_name(token_space, token_id)
        for token_id in range(token_space.text_vocab_size, token_space.vocab_size)
    ]


def add_modality_tokens(tokenizer: Any, token_space: TokenSpace) -> list[str]:
    """Add every new row of the token space to a text tokenizer as a special token, make the token space's pad id
    the tokenizer's pad token; return the names.

    Special tokens are matched whole by ``encode`` (never split into text pieces), dropped by
    ``decode(skip_special_tokens=True)``, and become CONTROL tokens in a GGUF file.

    The tokenizer must hold exactly the base text vocabulary (``len(tokenizer) == text_vocab_size``),
    otherwise the added tokens would land on the wrong ids; that and name clashes raise ValueError
    before anything is added.
    """
    if len(tokenizer) != token_space.text_vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the token space's text_vocab_size is "
            f"{token_space.text_vocab_size}; modality tokens must start right after the text vocabulary"
        )
    names = modality_token_names(token_space)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{token_space.source}: several ids would be named {duplicates[:5]}")
    clashes = sorted(set(names) & set(tokenizer.get_vocab()))
    if clashes:
        raise ValueError(f"the tokenizer already has tokens named {clashes[:5]}")
    tokenizer.add_tokens([AddedToken(name, special=True, normalized=False) for name in names], special_tokens=True)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(token_space.pad_token_id)
    return names


def has_tokenizer_files(directory: str) -> bool:
    """Whether a local directory holds a tokenizer (transformers 5 quietly loads an empty one from a directory
    that holds none, so look before loading)."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def load_extended_tokenizer(name_or_path: str, token_space: TokenSpace) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path)`` with every modality token added (`add_modality_tokens`).

    Raises ValueError naming ``name_or_path`` when it cannot be loaded or does not fit the token space.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        raise ValueError(f"tokenizer {name_or_path!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    try:
        add_modality_tokens(tokenizer, token_space)
    except ValueError as exc:
        raise ValueError(f"tokenizer {name_or_path!r}: {exc}") from exc
    return tokenizer


def _generated_name(token_space: TokenSpace, token_id: int) -> str:
    modality = token_space.modality_of_id(token_id)
    if modality is None:
        return f"<|unused_{token_id}|>"
    if modality == "audio":
        codebook, code = token_space.id_to_audio_code(token_id)
        return f"<|aud{codebook}_{code}|>"
    offset = token_id - token_space.ranges_of(modality)[0].start
    return f"<|{_ABBREVIATIONS.get(modality, modality)}_{offset}|>"
