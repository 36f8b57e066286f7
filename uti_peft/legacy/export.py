"""`export_legacy`: a row-extension adapter -> the three legacy files, with byte-identical tensors."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from safetensors.torch import load_file

from ..constants import (
    EXPORT_MARKER_NAME,
    INPUT_ROWS_KEY,
    LEGACY_JSON_NAME,
    LEGACY_PT_NAME,
    OUTPUT_ROWS_KEY,
    TOKEN_SPACE_NAME,
    WEIGHTS_NAME,
)
from ..adapter_folder import check_adapter_folder
from ..errors import LegacyCheckpointError
from ..output import PathLike
from ..row_extension.config import RowExtensionConfig
from ..token_space import TokenSpace
from .checkpoint import _atomic_output, _bar, _check_target, read_legacy
from .verify import _verify_written

# ---------------------------------------------------------------------------------------- export
def read_adapter(adapter_dir: PathLike) -> tuple[RowExtensionConfig, TokenSpace, dict[str, torch.Tensor]]:
    """Read a row-extension adapter directory for export (local only, nothing is downloaded): validated by
    `check_adapter_folder`, then the rows, which a legacy checkpoint needs as input rows (plus optional head rows)
    of one shape and dtype. Returns the config, the token space (from ``token_space.json``, whose key order the
    export keeps) and the rows."""
    folder = check_adapter_folder(adapter_dir)
    weights_path = os.path.join(folder.path, WEIGHTS_NAME)
    rows = load_file(weights_path)
    if INPUT_ROWS_KEY not in rows:
        raise LegacyCheckpointError(f"{weights_path}: a legacy checkpoint needs {INPUT_ROWS_KEY!r}, found {sorted(rows)}")
    embeddings = rows[INPUT_ROWS_KEY]
    for key, tensor in rows.items():
        if not tensor.is_floating_point() or tensor.dtype != embeddings.dtype:
            raise LegacyCheckpointError(
                f"{weights_path}: {key} is {list(tensor.shape)} {tensor.dtype} but {INPUT_ROWS_KEY} is "
                f"{list(embeddings.shape)} {embeddings.dtype}; a legacy checkpoint holds one float dtype"
            )
    return folder.config, TokenSpace.from_file(os.path.join(folder.path, TOKEN_SPACE_NAME)), rows


def export_legacy(
    adapter_dir: PathLike, output_dir: PathLike, *, overwrite: bool = False, progress: Optional[bool] = None
) -> str:
    """Write a row-extension adapter back as a legacy checkpoint directory: ``trainable_rows.pt``,
    ``trainable_rows.json`` and ``token_space.json``, with byte-identical tensors. Returns its path.

    The directory also gets a small marker file (``.uti-peft-export.json``, naming the source adapter):
    ``overwrite=True`` replaces only a directory holding it (an earlier export), never an original checkpoint
    our users' trainer wrote."""
    source = os.path.normpath(os.fspath(adapter_dir))
    target = os.path.abspath(os.fspath(output_dir))
    _check_target(target, overwrite, EXPORT_MARKER_NAME, (source,))
    config, space, rows = read_adapter(source)
    base_llm = config.base_model_name_or_path or space.base_text_model
    if not base_llm:
        raise LegacyCheckpointError(
            f"{source}: {ADAPTER_CONFIG_NAME} has no base_model_name_or_path and the token space no base_text_model; "
            "the legacy base_llm field cannot be filled"
        )
    embeddings, lm_head = rows[INPUT_ROWS_KEY], rows.get(OUTPUT_ROWS_KEY)
    payload = {
        "row_start": config.text_vocab_size,
        "row_end": config.vocab_size,
        "base_llm": base_llm,
        "embeddings": embeddings,
        "lm_head": lm_head,
        "dtype": str(embeddings.dtype),
    }
    meta = {k: payload[k] for k in ("row_start", "row_end", "base_llm")} | {"has_lm_head": lm_head is not None}
    with _atomic_output(target, overwrite=overwrite, marker=EXPORT_MARKER_NAME, protected=(source,)) as tmp:
        pt_path = os.path.join(tmp, LEGACY_PT_NAME)
        rows_bytes = sum(t.numel() * t.element_size() for t in rows.values())
        with _bar(rows_bytes, f"writing {LEGACY_PT_NAME}", progress) as bar:
            torch.save(payload, pt_path)
            back = read_legacy(pt_path)
            written = {INPUT_ROWS_KEY: back.embeddings}
            if back.lm_head is not None:
                written[OUTPUT_ROWS_KEY] = back.lm_head
            _verify_written(written, rows, pt_path, bar)
        with open(os.path.join(tmp, LEGACY_JSON_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        space.save(os.path.join(tmp, TOKEN_SPACE_NAME))
        with open(os.path.join(tmp, EXPORT_MARKER_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps({"written_by": "uti-peft export-legacy", "source_adapter": source}, indent=2) + "\n")
    return target
