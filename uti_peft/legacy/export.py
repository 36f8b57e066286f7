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
from ..errors import LegacyCheckpointError
from ..output import PathLike
from ..row_extension.config import RowExtensionConfig
from ..token_space import TokenSpace
from .checkpoint import _atomic_output, _bar, _check_target, _read_json, _token_space_mismatch, read_legacy
from .verify import _verify_written

# ---------------------------------------------------------------------------------------- export
def read_adapter(adapter_dir: PathLike) -> tuple[RowExtensionConfig, TokenSpace, dict[str, torch.Tensor]]:
    """Read and validate a row-extension adapter directory (local only, nothing is downloaded).

    Returns the config, the token space (from ``token_space.json`` when present, so that its key order is
    kept; it must equal the one inside ``adapter_config.json``) and the rows.
    """
    adapter_dir = os.path.normpath(os.fspath(adapter_dir))
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise LegacyCheckpointError(f"{adapter_dir}: not an adapter directory ({ADAPTER_CONFIG_NAME} is missing)")
    raw = _read_json(config_path, ADAPTER_CONFIG_NAME)
    if raw.get("peft_type") != "ROW_EXTENSION":
        raise LegacyCheckpointError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, expected 'ROW_EXTENSION'")
    config = RowExtensionConfig.from_pretrained(adapter_dir)  # the file exists locally: no Hub access
    space = config.get_token_space()
    space_path = os.path.join(adapter_dir, TOKEN_SPACE_NAME)
    if os.path.isfile(space_path):
        space_file = TokenSpace.from_file(space_path)
        mismatch = _token_space_mismatch(space, space_file)
        space = space_file
        if mismatch:
            raise LegacyCheckpointError(f"{config_path}: its token_space differs from {space_path}: {mismatch}")
    if not os.path.isfile(weights_path):
        raise LegacyCheckpointError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")
    try:
        rows = load_file(weights_path)
    except Exception as exc:
        raise LegacyCheckpointError(f"{weights_path}: cannot be read, truncated or corrupt ({exc})") from None
    if INPUT_ROWS_KEY not in rows or set(rows) - {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}:
        raise LegacyCheckpointError(
            f"{weights_path}: expected {INPUT_ROWS_KEY!r} (and optionally {OUTPUT_ROWS_KEY!r}), found {sorted(rows)}"
        )
    embeddings = rows[INPUT_ROWS_KEY]
    for key, tensor in rows.items():
        if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.shape[0] != config.num_new_rows:
            raise LegacyCheckpointError(
                f"{weights_path}: {key} is {list(tensor.shape)} {tensor.dtype}; expected a float tensor of "
                f"vocab_size - text_vocab_size = {config.num_new_rows} rows"
            )
        if tensor.shape != embeddings.shape or tensor.dtype != embeddings.dtype:
            raise LegacyCheckpointError(
                f"{weights_path}: {key} is {list(tensor.shape)} {tensor.dtype} but {INPUT_ROWS_KEY} is "
                f"{list(embeddings.shape)} {embeddings.dtype}; a legacy checkpoint holds one shape and dtype"
            )
    return config, space, rows


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
