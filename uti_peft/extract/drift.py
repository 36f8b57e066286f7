"""Comparing a source's vocabulary matrix with the base's: its shape, and how far its text rows drifted from the
base's (read 16 MiB at a time; the adapter keeps the base's text rows, so only a stated drift is accepted)."""

from __future__ import annotations

import math

import torch

from ..errors import ExtractError
from ..files import SAFETENSORS_DTYPES
from ..token_space import TokenSpace
from .base import BLOCK, Base, Rows


def largest_drift(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """The largest ``|a - b|`` (NaN/Inf mismatches count as infinite) and the row where it is."""
    diff = (a.double() - b.double()).abs().nan_to_num(nan=math.inf)
    diff[(a == b) | (a.isnan() & b.isnan())] = 0  # equal values, infinities and NaNs included, do not drift
    per_row = diff.amax(dim=1) if diff.dim() == 2 else diff.reshape(1, -1).amax(dim=1)
    row = int(per_row.argmax())
    return float(per_row[row]), row


def _text_drift(source: Rows, base: Rows, text: int, hidden: int, itemsize: int) -> tuple[float, int]:
    """The largest drift of the source's text rows from the base's, read 16 MiB at a time."""
    worst, where = 0.0, 0
    step = max(1, BLOCK // (hidden * itemsize))
    for start in range(0, text, step):
        a, b = source(start, min(start + step, text)), base(start, min(start + step, text))
        if torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            continue
        drift, row = largest_drift(a, b)
        if drift > worst:
            worst, where = drift, start + row
    return worst, where


def check_text_rows(what: str, name: str, source: Rows, base: Base, base_name: str, text: int,
                    max_drift: float, dtype: str) -> float:
    """Refuse text rows that drifted from the base's more than ``max_drift``; return the largest drift."""
    base_dtype = base.stored[base_name].entry["dtype"]
    if dtype != base_dtype:
        raise ExtractError(f"{what}: {name} is {dtype} but the base's {base_name} is {base_dtype}: the text rows "
                           "cannot be compared (convert the source to the base's dtype first)")
    hidden = base.stored[base_name].entry["shape"][1]
    itemsize = torch.empty(0, dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    drift, row = _text_drift(source, base.rows(base_name), text, hidden, itemsize)
    if drift > max_drift:
        raise ExtractError(
            f"{what}: {name} rows 0..{text - 1} (the text rows) differ from the base's {base_name}: largest "
            f"difference {drift:.6g} at token id {row}, tolerance --max-text-drift {max_drift:g}; this is not a "
            "vocabulary extension of this base (or pass --max-text-drift to accept the stated drift)"
        )
    return drift


def check_vocab_shape(where: str, name: str, shape: list[int], base: Base, base_name: str,
                      space: TokenSpace) -> None:
    """A source matrix must be ``[vocab_size, hidden]`` and hold more rows than the text vocabulary."""
    base_shape = base.stored[base_name].entry["shape"]
    text, total = space.text_vocab_size, space.vocab_size
    if len(shape) != 2 or shape[1] != base_shape[1]:
        raise ExtractError(f"{where}: {name} has shape {shape} but the base's {base_name} has {base_shape} "
                           f"(hidden size {base_shape[1]}): not an extension of this base")
    if base_shape[0] < text:
        raise ExtractError(f"base {base.dir!r}: {base_name} has {base_shape[0]} rows, fewer than the token space's "
                           f"text_vocab_size {text} ({space.source})")
    if shape[0] <= text:
        raise ExtractError(f"{where}: {name} has {shape[0]} rows, no more than the token space's text_vocab_size "
                           f"{text}: the source has no new rows to extract")
    if shape[0] != total:
        raise ExtractError(f"{where}: {name} has {shape[0]} rows but the token space ({space.source}) has "
                           f"vocab_size_total {total}; pass the token space the source was resized for")
