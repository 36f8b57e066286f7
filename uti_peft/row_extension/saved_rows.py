"""What a saved row-extension adapter's tensors must be, checked one way wherever they are read: by the tuner from
the tensors it loads (a local directory, a Hub repo or a state dict) and by `uti_peft.adapter_folder` from a local
file's safetensors header (push, merge, export, inspect)."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY
from ..errors import RowExtensionError
from .config import RowExtensionConfig


def check_row_blocks(blocks: Mapping[str, tuple[Sequence[int], bool]], config: RowExtensionConfig, where: str) -> int:
    """``blocks`` maps each tensor name to ``(shape, is_float)``; returns the rows' hidden size.

    Refused, naming ``where``, the tensor and both values: names other than the two row blocks, no row block, a
    block that is not a 2-d float tensor of ``vocab_size - text_vocab_size`` rows, two blocks of different widths.
    """
    unknown = sorted(set(blocks) - {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY})
    if unknown:
        raise RowExtensionError(
            f"{where} holds tensors this adapter type does not know: {unknown}; it must hold {INPUT_ROWS_KEY!r} "
            f"(and optionally {OUTPUT_ROWS_KEY!r}) only"
        )
    if not blocks:
        raise RowExtensionError(f"{where} holds no rows ({INPUT_ROWS_KEY!r} is missing)")
    expected = config.num_new_rows
    for key, (shape, is_float) in blocks.items():
        if len(shape) != 2 or not is_float:
            raise RowExtensionError(f"{where}: {key} must be a 2-d float tensor, found shape {list(shape)}")
        if shape[0] != expected:
            raise RowExtensionError(
                f"{where}: {key} has {shape[0]} rows but vocab_size - text_vocab_size is "
                f"{config.vocab_size} - {config.text_vocab_size} = {expected}"
            )
    widths = sorted({shape[1] for shape, _ in blocks.values()})
    if len(widths) != 1:
        raise RowExtensionError(f"{where}: the row tensors disagree on the hidden size: {widths}")
    return widths[0]
