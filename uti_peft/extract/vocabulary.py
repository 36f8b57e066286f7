"""The token space of a source: given, ``token_space.json`` beside it, or inferred from the tokens its tokenizer has
beyond the base tokenizer's (named as `uti_peft.tokenizer` names modality tokens)."""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from transformers import AutoTokenizer

from ..constants import TOKEN_SPACE_NAME
from ..errors import ExtractError, RowExtensionError
from ..tokenizer import has_tokenizer_files
from ..output import PathLike
from ..token_space import TokenSpace, resolve_token_space


def resolve_source_token_space(given: Union[None, TokenSpace, dict, PathLike], source_dir: str,
                               base_dir: str) -> TokenSpace:
    """``given``, else ``token_space.json`` beside the source, else inferred from the source tokenizer's tokens
    beyond the base tokenizer's (`infer_token_space`)."""
    space = resolve_token_space(given, source_dir, must_agree=True)
    return space if space is not None else infer_token_space(source_dir, base_dir)


_IMAGE_NAME = re.compile(r"^<\|img_(\d+)\|>$")
_AUDIO_NAME = re.compile(r"^<\|aud(\d+)_(\d+)\|>$")
_UNNAMED_SPECIAL = re.compile(r"^<\|special_(\d+)\|>$")


def infer_token_space(source_dir: str, base_dir: str) -> TokenSpace:
    """A token space built from the tokens the source's tokenizer has beyond the base's.

    ``text_vocab_size`` is the base tokenizer's length and ``vocab_size`` the source tokenizer's. Tokens named as
    `uti_peft.tokenizer` names them (``<|img_7|>``, ``<|aud2_5|>``) make the IMAGE and AUDIO_CB ranges; every other
    new token is a named special token of the SPECIAL range. Each range must be one contiguous run of ids, codes in
    order; otherwise the ranges cannot be inferred and `ExtractError` asks for ``--token-space``.
    """
    source_tok, base_tok = _tokenizer(source_dir, "source"), _tokenizer(base_dir, "base")
    text, total = len(base_tok), len(source_tok)
    where = f"the tokenizer in {source_dir}"
    if total <= text:
        raise ExtractError(f"{where} has {total} tokens, no more than the base tokenizer's {text}: the source adds no "
                           f"tokens, so it has no new rows to extract (pass --token-space if it does)")
    names = source_tok.convert_ids_to_tokens(list(range(text, total)))
    runs: list[tuple[str, int, int]] = []  # (range name, start, end)
    specials: dict[str, int] = {}
    for token_id, name in zip(range(text, total), names):
        range_name, code = _classify(name)
        if runs and runs[-1][0] == range_name:
            runs[-1] = (range_name, runs[-1][1], token_id)
        elif any(r[0] == range_name for r in runs):
            raise ExtractError(f"cannot infer the token space from {where}: {range_name} tokens are not one run of ids "
                               f"(id {token_id} is {name!r}); pass --token-space")
        else:
            runs.append((range_name, token_id, token_id))
        start = runs[-1][1]
        if code is not None and code != token_id - start:
            raise ExtractError(f"cannot infer the token space from {where}: id {token_id} is {name!r} but it is code "
                               f"{token_id - start} of {range_name}; pass --token-space")
        if range_name == "SPECIAL" and not _UNNAMED_SPECIAL.match(name):
            specials[name] = token_id
    ranges = {"TEXT": {"start": 0, "end": text - 1, "size": text}}
    ranges.update({n: {"start": s, "end": e, "size": e - s + 1} for n, s, e in runs})
    data: dict[str, Any] = {"version": "uti_v1", "text_vocab_size": text, "special_tokens": specials,
                            "ranges": ranges, "vocab_size_total": total}
    if "IMAGE" in ranges:
        data["image_tokenizer"] = {"codebook_size": ranges["IMAGE"]["size"]}
    audio = [r["size"] for n, r in ranges.items() if n.startswith("AUDIO_CB")]
    if audio:
        data["audio_codec"] = {"n_codebooks": len(audio), **({"codebook_size": audio[0]} if len(set(audio)) == 1 else {})}
    try:
        return TokenSpace(data, source=f"inferred from {where}")
    except RowExtensionError as exc:
        raise ExtractError(f"cannot infer the token space from {where} ({exc}); pass --token-space") from None


def _classify(name: str) -> tuple[str, Optional[int]]:
    """The range a new token's name puts it in, and its code there (None: a special token)."""
    if match := _IMAGE_NAME.match(name):
        return "IMAGE", int(match.group(1))
    if match := _AUDIO_NAME.match(name):
        return f"AUDIO_CB{match.group(1)}", int(match.group(2))
    return "SPECIAL", None


def _tokenizer(directory: str, what: str) -> Any:
    """The tokenizer in ``directory`` (the source's or the base's), or `ExtractError` saying why there is none."""
    reason = "it has no tokenizer files"
    if has_tokenizer_files(directory):
        try:
            return AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    raise ExtractError(f"no token space: the source has no {TOKEN_SPACE_NAME} and the {what} {directory!r} has no "
                       f"tokenizer to infer one from ({reason}); pass --token-space")
