"""The token space: which global token ids belong to text and to each added modality.

The JSON format is the one our users already ship (``token_space.json``): ``ranges`` map a name to an
inclusive ``[start, end]`` id range, ``TEXT`` starts at 0 and holds the base tokenizer's vocabulary,
everything above it (``SPECIAL``, ``IMAGE``, ``AUDIO_CB0..N-1``, or other modalities) is new rows.
Unknown fields are kept verbatim so that load/save round-trips them unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from typing import Any, Iterator, NamedTuple, Optional, Union

from .constants import TOKEN_SPACE_NAME
from .errors import TokenSpaceError

PAD_TOKEN = "<|pad_mm|>"
_CODEBOOK_SUFFIX = re.compile(r"^(?P<modality>.+)_CB(?P<index>\d+)$")


class TokenRange(NamedTuple):
    """An inclusive range of global token ids."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, int) and self.start <= token_id <= self.end


def modality_of(range_name: str) -> str:
    """Modality a range belongs to, in lower case: ``AUDIO_CB2`` -> ``audio``, ``IMAGE`` -> ``image``."""
    match = _CODEBOOK_SUFFIX.match(range_name)
    return (match.group("modality") if match else range_name).lower()


class TokenSpace:
    """A validated, read-only view of a token-space JSON document."""

    def __init__(self, data: dict[str, Any], source: str | None = None) -> None:
        self._data = copy.deepcopy(data)
        self.source = source or "token space"
        self.validate()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "TokenSpace":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise TokenSpaceError(f"{path}: token space file not found") from None
        except json.JSONDecodeError as exc:
            raise TokenSpaceError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TokenSpaceError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls(data, source=path)

    @classmethod
    def coerce(cls, value: Union["TokenSpace", dict, str, os.PathLike]) -> "TokenSpace":
        """Accept a TokenSpace, its dict form or a path to its JSON file."""
        if isinstance(value, TokenSpace):
            return value
        if isinstance(value, dict):
            return cls(value)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_file(value)
        raise TypeError(f"token_space must be a TokenSpace, dict or path, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        return json.dumps(self._data, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the JSON atomically (temp file + rename)."""
        from .output import write_text_atomically  # imports torch: only when saving

        write_text_atomically(path, self.to_json())

    def sha256(self) -> str:
        """Stable digest over canonical JSON (sorted keys, no whitespace), so key order never matters."""
        canonical = json.dumps(self._data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenSpace) and self._data == other._data

    def __repr__(self) -> str:
        names = ", ".join(f"{n}={r.size}" for n, r in self.ranges.items())
        return f"TokenSpace(text_vocab_size={self.text_vocab_size}, vocab_size={self.vocab_size}, {names})"

    # ------------------------------------------------------------------ derived facts
    @property
    def text_vocab_size(self) -> int:
        return self._data["text_vocab_size"]

    @property
    def vocab_size(self) -> int:
        """Total number of rows, ``vocab_size_total`` in the JSON."""
        return self._data["vocab_size_total"]

    @property
    def num_new_rows(self) -> int:
        return self.vocab_size - self.text_vocab_size

    @property
    def base_text_model(self) -> str | None:
        return self._data.get("base_text_model")

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._data.get("special_tokens", {}))

    @property
    def ranges(self) -> dict[str, TokenRange]:
        """All ranges by name, in id order."""
        ranges = {name: TokenRange(r["start"], r["end"]) for name, r in self._data["ranges"].items()}
        return dict(sorted(ranges.items(), key=lambda item: item[1].start))

    @property
    def modalities(self) -> list[str]:
        """Modalities in id order, e.g. ``['text', 'special', 'image', 'audio']``."""
        return list(dict.fromkeys(modality_of(name) for name in self.ranges))

    @property
    def image_tokenizer(self) -> dict[str, Any] | None:
        return copy.deepcopy(self._data.get("image_tokenizer"))

    @property
    def audio_codec(self) -> dict[str, Any] | None:
        return copy.deepcopy(self._data.get("audio_codec"))

    @property
    def pad_token_id(self) -> int:
        """Id of ``<|pad_mm|>``, or 0 when the space defines none (the legacy loader's rule)."""
        return self.special_tokens.get(PAD_TOKEN, 0)

    def ranges_of(self, modality: str) -> list[TokenRange]:
        """Ranges of one modality (``"audio"`` gives the codebooks in codebook order)."""
        wanted = modality.lower()
        found = [(name, r) for name, r in self.ranges.items() if modality_of(name) == wanted]
        if not found:
            raise KeyError(f"{self.source}: no range for modality {modality!r}; known: {self.modalities}")
        return [r for _, r in sorted(found, key=lambda item: _codebook_index(item[0]))]

    def modality_of_id(self, token_id: int) -> str | None:
        """The modality a global id belongs to, or None for an id outside every range."""
        for name, r in self.ranges.items():
            if token_id in r:
                return modality_of(name)
        return None

    def special_token_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"{self.source}: special token {token!r} is not defined") from None

    # ------------------------------------------------------------------ code <-> id
    def image_code_to_id(self, code: int) -> int:
        (image,) = self.ranges_of("image")
        return _offset(image, code, "image code")

    def id_to_image_code(self, token_id: int) -> int:
        (image,) = self.ranges_of("image")
        if token_id not in image:
            raise ValueError(f"token id {token_id} is not an image token (IMAGE is {image.start}..{image.end})")
        return token_id - image.start

    def audio_code_to_id(self, codebook: int, code: int) -> int:
        codebooks = self.ranges_of("audio")
        if not 0 <= codebook < len(codebooks):
            raise ValueError(f"audio codebook {codebook} out of range: the token space has {len(codebooks)}")
        return _offset(codebooks[codebook], code, f"audio code of codebook {codebook}")

    def id_to_audio_code(self, token_id: int) -> tuple[int, int]:
        """Global id -> ``(codebook, code)``."""
        for codebook, r in enumerate(self.ranges_of("audio")):
            if token_id in r:
                return codebook, token_id - r.start
        raise ValueError(f"token id {token_id} is not an audio token")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise TokenSpaceError naming the field and the disagreeing values, else return None."""
        data, src = self._data, self.source
        for key in ("text_vocab_size", "vocab_size_total", "ranges"):
            if key not in data:
                raise TokenSpaceError(f"{src}: missing field {key!r}")
        for key in ("text_vocab_size", "vocab_size_total"):
            if not is_plain_int(data[key]) or data[key] <= 0:
                raise TokenSpaceError(f"{src}: {key} must be a positive integer, found {data[key]!r}")
        if not isinstance(data["ranges"], dict) or not data["ranges"]:
            raise TokenSpaceError(f"{src}: ranges must be a non-empty object, found {data['ranges']!r}")

        for name, r in data["ranges"].items():
            for key in ("start", "end", "size"):
                if not isinstance(r, dict) or not is_plain_int(r.get(key)):
                    raise TokenSpaceError(f"{src}: ranges.{name}.{key} must be an integer, found {r!r}")
            if r["start"] < 0 or r["end"] < r["start"]:
                raise TokenSpaceError(f"{src}: ranges.{name} has start {r['start']} and end {r['end']}")
            if r["size"] != r["end"] - r["start"] + 1:
                raise TokenSpaceError(
                    f"{src}: ranges.{name}.size is {r['size']} but end - start + 1 is {r['end'] - r['start'] + 1}"
                )

        ranges = self.ranges
        text = ranges.get("TEXT")
        if text is None:
            raise TokenSpaceError(f"{src}: ranges.TEXT is missing")
        if text.start != 0:
            raise TokenSpaceError(f"{src}: ranges.TEXT.start must be 0, found {text.start}")
        if text.size != data["text_vocab_size"]:
            raise TokenSpaceError(
                f"{src}: ranges.TEXT.size is {text.size} but text_vocab_size is {data['text_vocab_size']}"
            )

        ordered = list(ranges.items())
        for (name_a, a), (name_b, b) in zip(ordered, ordered[1:]):
            if b.start <= a.end:
                raise TokenSpaceError(
                    f"{src}: ranges.{name_a} ({a.start}..{a.end}) overlaps ranges.{name_b} ({b.start}..{b.end})"
                )
        max_end = ordered[-1][1].end
        if data["vocab_size_total"] != max_end + 1:
            raise TokenSpaceError(
                f"{src}: vocab_size_total is {data['vocab_size_total']} but the last range ends at {max_end} "
                f"(expected {max_end + 1})"
            )

        self._validate_special_tokens(ranges)
        self._validate_codebooks(ranges)

    def _validate_special_tokens(self, ranges: dict[str, TokenRange]) -> None:
        specials = self._data.get("special_tokens", {})
        if not isinstance(specials, dict):
            raise TokenSpaceError(f"{self.source}: special_tokens must be an object, found {specials!r}")
        if not specials:
            return
        special = ranges.get("SPECIAL")
        if special is None:
            raise TokenSpaceError(f"{self.source}: special_tokens are defined but ranges.SPECIAL is missing")
        seen: dict[int, str] = {}
        for token, token_id in specials.items():
            if token_id not in special:
                raise TokenSpaceError(
                    f"{self.source}: special_tokens[{token!r}] is {token_id!r}, outside ranges.SPECIAL "
                    f"({special.start}..{special.end})"
                )
            if token_id in seen:
                raise TokenSpaceError(
                    f"{self.source}: special_tokens {seen[token_id]!r} and {token!r} share id {token_id}"
                )
            seen[token_id] = token

    def _validate_codebooks(self, ranges: dict[str, TokenRange]) -> None:
        src = self.source
        image_cfg = self._data.get("image_tokenizer") or {}
        if "IMAGE" in ranges and is_plain_int(image_cfg.get("codebook_size")):
            if image_cfg["codebook_size"] != ranges["IMAGE"].size:
                raise TokenSpaceError(
                    f"{src}: image_tokenizer.codebook_size is {image_cfg['codebook_size']} "
                    f"but ranges.IMAGE.size is {ranges['IMAGE'].size}"
                )
        codec = self._data.get("audio_codec") or {}
        blocks = sorted((_codebook_index(n), n, r) for n, r in ranges.items() if modality_of(n) == "audio")
        if not codec or not blocks:
            return
        n_codebooks = codec.get("n_codebooks")
        if is_plain_int(n_codebooks) and n_codebooks != len(blocks):
            raise TokenSpaceError(
                f"{src}: audio_codec.n_codebooks is {n_codebooks} but there are {len(blocks)} AUDIO_CB ranges"
            )
        indices = [index for index, _, _ in blocks]
        if indices != list(range(len(blocks))):
            raise TokenSpaceError(f"{src}: AUDIO_CB ranges must be numbered 0..{len(blocks) - 1}, found {indices}")
        codebook_size = codec.get("codebook_size")
        for _, name, r in blocks:
            if is_plain_int(codebook_size) and r.size != codebook_size:
                raise TokenSpaceError(
                    f"{src}: ranges.{name}.size is {r.size} but audio_codec.codebook_size is {codebook_size}"
                )


def resolve_token_space(
    given: Union[None, "TokenSpace", dict, str, os.PathLike] = None,
    directory: Optional[Union[str, os.PathLike]] = None,
    *,
    must_agree: bool = False,
) -> Optional["TokenSpace"]:
    """The token space to use: ``given`` (a `TokenSpace`, its dict or a path), else ``token_space.json`` in
    ``directory``, else None. With ``must_agree``, a given one must equal the directory's (every differing field
    is named); this is how every command finds its token space."""
    path = os.path.join(os.fspath(directory), TOKEN_SPACE_NAME) if directory is not None else None
    in_directory = TokenSpace.from_file(path) if path and os.path.isfile(path) else None
    if given is None:
        return in_directory
    space = TokenSpace.coerce(given)
    if must_agree and in_directory is not None:
        mismatch = token_space_mismatch(in_directory, space)
        if mismatch:
            raise TokenSpaceError(f"the token space passed explicitly (--token-space) differs from {path}: {mismatch}")
    return space


def token_space_mismatch(a: "TokenSpace", b: "TokenSpace", limit: int = 12) -> Optional[str]:
    """None if two token spaces are equal, else which fields differ and how (at most ``limit`` listed)."""
    differences = list(_diff(a.to_dict(), b.to_dict()))
    if not differences:
        return None
    shown = "; ".join(f"{path}: {va!r} vs {vb!r}" for path, va, vb in differences[:limit])
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return f"{len(differences)} field(s) differ ({a.source} vs {b.source}): {shown}{more}"


def _diff(a: Any, b: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(path, a value, b value)`` for every leaf where two JSON documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                yield path, a.get(key, "<missing>"), b.get(key, "<missing>")
            else:
                yield from _diff(a[key], b[key], path)
    elif a != b or type(a) is not type(b):
        yield prefix or "<document>", a, b


def is_plain_int(value: object) -> bool:
    """An int that is not a bool (JSON integers only)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _codebook_index(range_name: str) -> int:
    match = _CODEBOOK_SUFFIX.match(range_name)
    return int(match.group("index")) if match else 0


def _offset(r: TokenRange, code: int, what: str) -> int:
    if not 0 <= code < r.size:
        raise ValueError(f"{what} {code} out of range 0..{r.size - 1}")
    return r.start + code
