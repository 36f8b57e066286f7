"""`plan_extract`: BASE and SOURCE resolved, read and checked, and the rows decided; nothing written."""

from __future__ import annotations

import math
import os
from typing import Optional, Union

from ..errors import ExtractError, MergeError
from ..merge import BASE_FILES, resolve_dir
from ..output import PathLike
from ..token_space import TokenSpace
from .base import read_base
from .checkpoint import plan_checkpoint
from .peft_sources import plan_peft
from .sources import CHECKPOINT, ExtractPlan, source_kind
from .vocabulary import resolve_source_token_space


def plan_extract(
    base: PathLike,
    source: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    max_text_drift: float = 0.0,
    progress: Optional[bool] = None,
) -> ExtractPlan:
    """Resolve, read and check everything `extract_adapter` writes; nothing is written."""
    if not (max_text_drift >= 0 and math.isfinite(max_text_drift)):
        raise ExtractError(f"max_text_drift is {max_text_drift!r}; expected a finite number >= 0")
    try:
        base_info = read_base(base)
        source_dir = resolve_dir(source, "source", [*BASE_FILES, "*.bin"])
    except MergeError as exc:
        raise ExtractError(str(exc)) from None
    kind = source_kind(source_dir)
    space = resolve_source_token_space(token_space, source_dir, base_info.dir)
    try:
        if kind == CHECKPOINT:
            plan = plan_checkpoint(base_info, source_dir, space, max_text_drift, progress)
        else:
            plan = plan_peft(base_info, source_dir, kind, space, max_text_drift)
    except MergeError as exc:
        raise ExtractError(str(exc)) from None
    plan.base_ref, plan.source_ref = os.fspath(base), os.fspath(source)
    matrix = base_info.stored[base_info.head or base_info.embed]
    row_bytes = matrix.nbytes // matrix.entry["shape"][0]
    plan.new_rows_file_offset = matrix.offset + space.text_vocab_size * row_bytes
    return plan
