"""Reading a legacy checkpoint directory safely: ``trainable_rows.pt`` without executing pickled code, checked
against ``trainable_rows.json`` and the token space (see `uti_peft.legacy`)."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from ..constants import LEGACY_JSON_NAME, LEGACY_PT_NAME
from ..errors import LegacyCheckpointError
from ..output import PathLike, atomic_output, check_target
from ..token_space import TokenSpace, is_plain_int

PT_FIELDS = ("row_start", "row_end", "base_llm", "embeddings", "lm_head", "dtype")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the PROTO opcode every pickle of protocol 2 and later (all torch.save ones) starts with

@dataclass
class LegacyCheckpoint:
    """A validated ``trainable_rows.pt`` (tensors may be memory-mapped)."""

    path: str  # the .pt file
    row_start: int
    row_end: int
    base_llm: str
    embeddings: torch.Tensor
    lm_head: Optional[torch.Tensor]
    json_meta: Optional[dict[str, Any]]

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]


# ---------------------------------------------------------------------------------------- reading
def _resolve_checkpoint(checkpoint: PathLike) -> tuple[str, str]:
    """``(directory, .pt path)`` for a checkpoint directory or a path to its ``trainable_rows.pt``."""
    path = os.path.normpath(os.fspath(checkpoint))
    if os.path.isfile(path):
        return os.path.dirname(path) or ".", path
    if not os.path.isdir(path):
        raise LegacyCheckpointError(f"{path}: no such checkpoint directory")
    pt_path = os.path.join(path, LEGACY_PT_NAME)
    if not os.path.isfile(pt_path):
        raise LegacyCheckpointError(f"{path}: not a legacy checkpoint ({LEGACY_PT_NAME} is missing)")
    return path, pt_path


def _load_weights_only(pt_path: str) -> Any:
    """``torch.load`` that never runs pickled code; memory-mapped when the file is a zip checkpoint."""
    with open(pt_path, "rb") as f:
        head = f.read(16)
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and not head.startswith(_PICKLE_PROTO):
        raise LegacyCheckpointError(
            f"{pt_path}: not a torch checkpoint: torch.save writes a zip archive (or, before torch 1.6, a pickle), "
            f"and this file is neither (it starts with {head[:8]!r})"
        )
    try:
        return torch.load(pt_path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        code = _pickled_code(exc)
        if code:
            raise LegacyCheckpointError(
                f"{pt_path}: refused: the file asks to run `{code}`; uti-peft never executes pickled code. "
                "A trainable_rows.pt holds tensors and plain values only: re-save the rows as such"
            ) from None
        raise LegacyCheckpointError(
            f"{pt_path}: cannot be read: the pickle is truncated, corrupt or holds more than tensors and plain values "
            f"({_unpickler_detail(exc)})"
        ) from None
    except Exception as exc:  # truncated zip, short file, garbage: torch raises many different types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LegacyCheckpointError(
            f"{pt_path}: cannot be read: the file is truncated, corrupt or not a torch checkpoint ({first_line})"
        ) from None


_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _pickled_code(exc: Exception) -> Optional[str]:
    """The callable a refused pickle names (``posix.system``, ``builtins.exec``), if it names one."""
    match = _GLOBAL.search(str(exc))
    return match.group(1) if match else None


def _unpickler_detail(exc: Exception) -> str:
    """torch's reason, without its advice to load with ``weights_only=False`` (which would run the code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    reasons = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
               and "documentation" not in line]
    return reasons[0] if reasons else type(exc).__name__


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LegacyCheckpointError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LegacyCheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LegacyCheckpointError(f"{path}: {what} must be a JSON object, found {type(data).__name__}")
    return data


def _dtype_name(dtype: Union[torch.dtype, str]) -> str:
    """``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _validate_pt(obj: Any, pt_path: str) -> LegacyCheckpoint:
    if not isinstance(obj, dict):
        raise LegacyCheckpointError(f"{pt_path}: expected a dict of {PT_FIELDS}, found {type(obj).__name__}")
    missing = [key for key in PT_FIELDS if key not in obj]
    if missing:
        raise LegacyCheckpointError(f"{pt_path}: missing field(s) {missing}; found {sorted(map(str, obj))}")
    unknown = sorted(str(key) for key in obj if key not in PT_FIELDS)
    if unknown:
        warnings.warn(f"{pt_path}: ignoring unknown field(s) {unknown}")
    row_start, row_end, base_llm = obj["row_start"], obj["row_end"], obj["base_llm"]
    for key in ("row_start", "row_end"):
        if not is_plain_int(obj[key]) or obj[key] < 0:
            raise LegacyCheckpointError(f"{pt_path}: {key} must be a non-negative integer, found {obj[key]!r}")
    if row_end <= row_start:
        raise LegacyCheckpointError(f"{pt_path}: row_end {row_end} must be greater than row_start {row_start}")
    if not isinstance(base_llm, str) or not base_llm:
        raise LegacyCheckpointError(f"{pt_path}: base_llm must be a non-empty string, found {base_llm!r}")

    embeddings, lm_head = obj["embeddings"], obj["lm_head"]
    expected_rows = row_end - row_start
    for key, tensor in (("embeddings", embeddings), ("lm_head", lm_head)):
        if key == "lm_head" and tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise LegacyCheckpointError(f"{pt_path}: {key} must be a tensor, found {type(tensor).__name__}")
        if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.shape[1] == 0:
            raise LegacyCheckpointError(
                f"{pt_path}: {key} must be a 2-d float tensor [rows, hidden], found {list(tensor.shape)} {tensor.dtype}"
            )
        if tensor.shape[0] != expected_rows:
            raise LegacyCheckpointError(
                f"{pt_path}: {key} has {tensor.shape[0]} rows but row_end - row_start is "
                f"{row_end} - {row_start} = {expected_rows}"
            )
    if lm_head is not None and (lm_head.shape != embeddings.shape or lm_head.dtype != embeddings.dtype):
        raise LegacyCheckpointError(
            f"{pt_path}: lm_head is {list(lm_head.shape)} {lm_head.dtype} but embeddings is "
            f"{list(embeddings.shape)} {embeddings.dtype}; they must match"
        )
    if not isinstance(obj["dtype"], (str, torch.dtype)) or _dtype_name(obj["dtype"]) != _dtype_name(embeddings.dtype):
        raise LegacyCheckpointError(
            f"{pt_path}: dtype field is {obj['dtype']!r} but the embeddings tensor is {embeddings.dtype}"
        )
    return LegacyCheckpoint(pt_path, row_start, row_end, base_llm, embeddings, lm_head, json_meta=None)


def _check_json_agreement(ckpt: LegacyCheckpoint, meta: dict[str, Any], json_path: str) -> None:
    """``trainable_rows.json`` must say what ``trainable_rows.pt`` holds."""
    from_pt = {
        "row_start": ckpt.row_start,
        "row_end": ckpt.row_end,
        "base_llm": ckpt.base_llm,
        "has_lm_head": ckpt.lm_head is not None,
    }
    differ = [
        f"{key}: {meta[key]!r} in {os.path.basename(json_path)} vs {value!r} in {os.path.basename(ckpt.path)}"
        for key, value in from_pt.items()
        if key in meta and (meta[key] != value or type(meta[key]) is not type(value))
    ]
    if differ:
        raise LegacyCheckpointError(f"{json_path} disagrees with {ckpt.path}: " + "; ".join(differ))


def _check_token_space(ckpt: LegacyCheckpoint, space: TokenSpace) -> None:
    for key, value, expected, name in (
        ("row_start", ckpt.row_start, space.text_vocab_size, "text_vocab_size"),
        ("row_end", ckpt.row_end, space.vocab_size, "vocab_size_total"),
    ):
        if value != expected:
            raise LegacyCheckpointError(
                f"{ckpt.path}: {key} is {value} but the token space ({space.source}) has {name} {expected}"
            )
    # a local directory's name says nothing about the model it holds: only model ids are compared
    if space.base_text_model and space.base_text_model != ckpt.base_llm and not os.path.isdir(ckpt.base_llm or ""):
        warnings.warn(
            f"{ckpt.path}: base_llm is {ckpt.base_llm!r} but the token space ({space.source}) was built for "
            f"{space.base_text_model!r}"
        )


def _nonfinite_rows(tensor: torch.Tensor, chunk_rows: int = 4096) -> list[int]:
    bad: list[int] = []
    for index, chunk in enumerate(tensor.split(chunk_rows)):
        rows = (~torch.isfinite(chunk)).any(dim=1).nonzero().flatten()
        bad.extend((rows + index * chunk_rows).tolist())
    return bad


def _all_finite(tensor: torch.Tensor) -> bool:
    """One fast pass: the minimum and maximum are NaN when any value is (aminmax propagates NaN) and
    ±Inf when any value is infinite, so both finite means every value is."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_finite(name: str, tensor: torch.Tensor, row_start: int, where: str, allow: bool) -> None:
    if _all_finite(tensor):
        return
    bad = _nonfinite_rows(tensor)  # the slow, exact pass only when there is something to report
    if not bad:
        return
    ids = [row_start + i for i in bad[:8]]
    more = " ..." if len(bad) > len(ids) else ""
    message = f"{where}: {name} has NaN/Inf values in {len(bad)} row(s), token ids {ids}{more}"
    if not allow:
        raise LegacyCheckpointError(f"{message}; pass --allow-nonfinite (allow_nonfinite=True) to convert anyway")
    warnings.warn(f"{message} (kept: allow_nonfinite)")


def read_legacy(checkpoint: PathLike) -> LegacyCheckpoint:
    """Read and validate ``trainable_rows.pt`` (and ``trainable_rows.json`` beside it, when present).

    Never executes pickled code. Tensors are memory-mapped when the file allows it.
    """
    checkpoint_dir, pt_path = _resolve_checkpoint(checkpoint)
    ckpt = _validate_pt(_load_weights_only(pt_path), pt_path)
    json_path = os.path.join(checkpoint_dir, LEGACY_JSON_NAME)
    if os.path.isfile(json_path):
        ckpt.json_meta = _read_json(json_path, LEGACY_JSON_NAME)
        _check_json_agreement(ckpt, ckpt.json_meta, json_path)
    return ckpt


def _bar(total: int, desc: str, progress: Optional[bool]) -> tqdm:
    """A byte progress bar; ``progress=None`` shows it on a terminal only."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if progress is None else not progress)


def _read_eval_report(value: Union[None, PathLike, dict]) -> tuple[Optional[dict], Optional[str]]:
    if value is None:
        return None, None
    if isinstance(value, dict):
        report, where = value, "eval_report"
    else:
        where = os.fspath(value)
        report = _read_json(where, "eval report")
    if not isinstance(report.get("loss_mean"), dict):
        raise LegacyCheckpointError(
            f"{where}: an eval report needs a 'loss_mean' object, found {report.get('loss_mean', '<missing>')!r}"
        )
    return report, (None if isinstance(value, dict) else where)


# ---------------------------------------------------------------------------------------- atomic output
def _check_target(target: str, overwrite: bool, marker: str, protected: tuple[str, ...]) -> None:
    check_target(target, overwrite, marker, protected, LegacyCheckpointError)


def _atomic_output(target: PathLike, *, overwrite: bool, marker: str, protected: tuple[str, ...] = ()):
    return atomic_output(target, overwrite=overwrite, marker=marker, protected=protected, error=LegacyCheckpointError)
