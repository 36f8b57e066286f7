"""`inspect_checkpoint`: what a legacy checkpoint or an adapter directory holds, without loading a model."""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any, Optional, Union

from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME

from ..card import CARD_NAME
from ..constants import LEGACY_JSON_NAME, LEGACY_PT_NAME, OUTPUT_ROWS_KEY, TOKEN_SPACE_NAME, WEIGHTS_NAME
from ..adapter_folder import check_adapter_folder
from ..errors import LegacyCheckpointError
from ..extract import CHECKPOINT_FILES, EXTRACTABLE, describe_source
from ..files import SAFETENSORS_DTYPES, read_safetensors_header
from ..output import PathLike
from ..token_space import TokenSpace, is_plain_int, resolve_token_space
from .checkpoint import _check_json_agreement, _check_token_space, _dtype_name, _load_weights_only, _read_json, _resolve_checkpoint, _validate_pt

# ---------------------------------------------------------------------------------------- inspect
def inspect_checkpoint(
    path: PathLike, *, token_space: Union[None, TokenSpace, dict, PathLike] = None
) -> dict[str, Any]:
    """What a legacy checkpoint or an adapter holds, read from headers and metadata (no model is loaded).

    Unsafe, missing or unreadable weight files raise (a truncated ``adapter_model.safetensors`` is an error, not a
    remark: a script must not take it for a good adapter); inconsistencies (ranges vs token space, json vs pt) are
    listed under ``problems``.
    """
    path = os.path.normpath(os.fspath(path))
    if os.path.isfile(path) and os.path.basename(path) in (ADAPTER_CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)):
        if _read_json(os.path.join(path, ADAPTER_CONFIG_NAME), ADAPTER_CONFIG_NAME).get("peft_type") in EXTRACTABLE:
            return describe_source(path)  # a PEFT vocabulary adapter that `uti-peft extract` turns into rows
        return _inspect_adapter(path)
    if (os.path.isdir(path) and os.path.isfile(os.path.join(path, LEGACY_PT_NAME))) or os.path.isfile(path):
        return _inspect_legacy(path, token_space)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in CHECKPOINT_FILES):
        return describe_source(path)  # a (resized) checkpoint
    raise LegacyCheckpointError(
        f"{path}: neither a legacy checkpoint ({LEGACY_PT_NAME}), an adapter directory ({ADAPTER_CONFIG_NAME}) nor a "
        "safetensors checkpoint"
    )


def _space_facts(space: Optional[TokenSpace]) -> dict[str, Any]:
    if space is None:
        return {"token_space": None, "token_space_sha256": None, "modalities": None}
    ranges = {name: f"{r.start}..{r.end}" for name, r in space.ranges.items()}
    return {"token_space": space.source, "token_space_sha256": space.sha256(), "modalities": space.modalities,
            "ranges": ranges}


def _inspect_legacy(path: str, token_space: Any) -> dict[str, Any]:
    checkpoint, pt_path = _resolve_checkpoint(path)
    ckpt = _validate_pt(_load_weights_only(pt_path), pt_path)
    problems: list[str] = []
    json_path = os.path.join(checkpoint, LEGACY_JSON_NAME)
    if os.path.isfile(json_path):
        try:
            _check_json_agreement(ckpt, _read_json(json_path, LEGACY_JSON_NAME), json_path)
        except ValueError as exc:
            problems.append(str(exc))
    else:
        problems.append(f"{LEGACY_JSON_NAME} is missing")
    space = None
    try:
        space = resolve_token_space(token_space, checkpoint, must_agree=True)
        if space is None:
            problems.append(f"{TOKEN_SPACE_NAME} is missing (pass --token-space)")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _check_token_space(ckpt, space)
    except ValueError as exc:
        problems.append(str(exc))
    evals = sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint, "eval*.json")))
    return {
        "format": f"legacy checkpoint ({LEGACY_PT_NAME})",
        "path": pt_path,
        "file_bytes": os.path.getsize(pt_path),
        "base_model": ckpt.base_llm,
        "row_range": f"[{ckpt.row_start}, {ckpt.row_end})",
        "new_rows": ckpt.row_end - ckpt.row_start,
        "hidden_size": ckpt.hidden_size,
        "dtype": _dtype_name(ckpt.dtype),
        "lm_head_rows": ckpt.lm_head is not None,
        **_space_facts(space),
        "eval_reports": evals,
        "problems": problems,
    }


def _inspect_adapter(adapter_dir: str) -> dict[str, Any]:
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    raw = _read_json(config_path, ADAPTER_CONFIG_NAME)
    if raw.get("peft_type") != "ROW_EXTENSION":
        raise LegacyCheckpointError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, expected 'ROW_EXTENSION'")
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:  # the rows themselves: unreadable is an error (once), not one more problem on the list
        header = read_safetensors_header(weights_path)
    except (OSError, ValueError) as exc:
        own_words = isinstance(exc, OSError) and exc.strerror
        reason = exc.strerror if own_words else str(exc).removeprefix(f"{weights_path}: ")
        raise LegacyCheckpointError(f"{weights_path}: cannot be read ({reason})") from None
    problems: list[str] = []
    space = None
    try:
        space = TokenSpace(raw.get("token_space") or {}, source=f"{config_path} token_space")
        if raw.get("token_space_sha256") not in (None, space.sha256()):
            problems.append(
                f"token_space_sha256 is {raw['token_space_sha256']} but the token space hashes to {space.sha256()}"
            )
    except ValueError as exc:
        problems.append(str(exc))
    try:
        check_adapter_folder(adapter_dir)
    except ValueError as exc:  # listed, not raised: inspect says what is there and what is wrong
        problems.append(str(exc))
    tensors: dict[str, str] = {}
    hidden = dtype = None
    for key, entry in sorted(header.items()):
        if key != "__metadata__":
            shape, dtype = entry["shape"], _dtype_name(SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
            tensors[key] = f"{shape} {dtype}"
            hidden = shape[-1] if len(shape) == 2 else hidden
    text, total = raw.get("text_vocab_size"), raw.get("vocab_size")
    return {
        "format": "PEFT adapter (ROW_EXTENSION)",
        "path": adapter_dir,
        "file_bytes": os.path.getsize(weights_path),
        "base_model": raw.get("base_model_name_or_path"),
        "row_range": f"[{text}, {total})",
        "new_rows": total - text if is_plain_int(text) and is_plain_int(total) else None,
        "hidden_size": hidden,
        "dtype": dtype,
        "lm_head_rows": OUTPUT_ROWS_KEY in tensors,
        "tensors": tensors,
        **_space_facts(space),
        "problems": problems,
    }
