"""Legacy ``trainable_rows.pt`` checkpoints <-> row-extension PEFT adapters, bit-exact and safe.

A legacy checkpoint directory holds ``trainable_rows.pt`` (a ``torch.save``d dict: ``row_start``,
``row_end``, ``base_llm``, ``embeddings``, ``lm_head`` or None, ``dtype``), ``trainable_rows.json``
(``row_start``, ``row_end``, ``base_llm``, ``has_lm_head``) and usually ``token_space.json``.

* `convert_legacy` turns one into a PEFT adapter directory (config, rows, token space, model card);
* `export_legacy` writes the three legacy files back from an adapter;
* `inspect_checkpoint` says what either holds without loading a model.

Nothing pickled is ever executed (``torch.load(weights_only=True)``), everything is validated before
anything is written, and outputs appear atomically (temporary directory beside the target, renamed at
the end): on any error nothing is left behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import re
import struct
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .card import CARD_NAME
from .constants import (
    EXPORT_MARKER_NAME,
    INPUT_ROWS_KEY,
    LEGACY_JSON_NAME,
    LEGACY_PT_NAME,
    OUTPUT_ROWS_KEY,
    TOKEN_SPACE_NAME,
    WEIGHTS_NAME,
)
from .errors import LegacyCheckpointError, RowExtensionError
from .files import DTYPES, SAFETENSORS_DTYPES, dtype_from_name, file_sha256
from .output import atomic_output, check_target
from .row_extension.config import RowExtensionConfig
from .row_extension.lora import LORA_ADAPTER_NAME, read_legacy_lora, write_lora
from .token_space import TokenSpace, is_plain_int

PT_FIELDS = ("row_start", "row_end", "base_llm", "embeddings", "lm_head", "dtype")
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 22  # 4 MiB

PathLike = Union[str, os.PathLike]


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
        is_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
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


def _token_space_mismatch(a: TokenSpace, b: TokenSpace, limit: int = 12) -> Optional[str]:
    differences = list(_diff(a.to_dict(), b.to_dict()))
    if not differences:
        return None
    shown = "; ".join(f"{path}: {va!r} vs {vb!r}" for path, va, vb in differences[:limit])
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return f"{len(differences)} field(s) differ ({a.source} vs {b.source}): {shown}{more}"


def _resolve_token_space(checkpoint_dir: str, given: Any) -> Optional[TokenSpace]:
    """The token space given explicitly, else the one in the directory; both present must agree."""
    in_dir_path = os.path.join(checkpoint_dir, TOKEN_SPACE_NAME)
    in_dir = TokenSpace.from_file(in_dir_path) if os.path.isfile(in_dir_path) else None
    if given is None:
        return in_dir
    space = TokenSpace.coerce(given)
    if in_dir is not None:
        mismatch = _token_space_mismatch(in_dir, space)
        if mismatch:
            raise LegacyCheckpointError(
                f"the token space passed explicitly (--token-space) differs from {in_dir_path}: {mismatch}"
            )
    return space


def _check_token_space(ckpt: LegacyCheckpoint, space: TokenSpace) -> None:
    for key, value, expected, name in (
        ("row_start", ckpt.row_start, space.text_vocab_size, "text_vocab_size"),
        ("row_end", ckpt.row_end, space.vocab_size, "vocab_size_total"),
    ):
        if value != expected:
            raise LegacyCheckpointError(
                f"{ckpt.path}: {key} is {value} but the token space ({space.source}) has {name} {expected}"
            )
    if space.base_text_model and space.base_text_model != ckpt.base_llm:
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


# ---------------------------------------------------------------------------------------- convert
def convert_legacy(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    base_model: Optional[str] = None,
    dtype: Union[None, str, torch.dtype] = None,
    eval_report: Union[None, PathLike, dict] = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: Optional[bool] = None,
    lora_dir: Optional[PathLike] = None,
) -> str:
    """Convert a legacy ``trainable_rows.pt`` checkpoint into a row-extension PEFT adapter directory.

    Args:
        checkpoint_dir: The checkpoint directory (or the path of its ``trainable_rows.pt``).
        output_dir: The adapter directory to create: ``adapter_config.json``, ``adapter_model.safetensors``
            (the rows only), ``token_space.json`` and a ``README.md`` model card.
        token_space: The token space, when it is not (only) in the checkpoint directory; if both exist they
            must be identical.
        base_model: The adapter's base model id; default: ``base_llm`` from the checkpoint.
        dtype: ``None``/``"keep"`` (default) keeps the rows' dtype; else ``"bfloat16"``, ``"float16"``,
            ``"float32"`` (or a ``torch.dtype``).
        eval_report: The users' eval JSON (path or dict, ``{"loss_mean": ..., "counts": ...}``) for the card.
        overwrite: Replace an existing output directory (one that is empty or holds an adapter).
        allow_nonfinite: Convert rows holding NaN/Inf instead of refusing them.
        progress: Progress bars: ``None`` on a terminal only, ``True``/``False`` always/never.
        lora_dir: A Stage-4 PEFT LoRA directory trained on the legacy (resized) model: it is stored as the
            adapter's LoRA (``lora/``) and loads with the rows (see `uti_peft.row_extension.lora`).

    Returns:
        The absolute path of the adapter directory. Raises `LegacyCheckpointError` (a ``ValueError``), or
        `TokenSpaceError`, naming the file, the field and the values; nothing is written then.
    """
    checkpoint, pt_path = _resolve_checkpoint(checkpoint_dir)
    target = os.path.abspath(os.fspath(output_dir))
    out_dtype = _parse_dtype(dtype)
    _check_target(target, overwrite, ADAPTER_CONFIG_NAME, (checkpoint,))
    space = _resolve_token_space(checkpoint, token_space)
    if space is None:
        raise LegacyCheckpointError(
            f"{checkpoint}: no {TOKEN_SPACE_NAME} in the checkpoint directory; pass its path with --token-space "
            "(token_space=...), e.g. outputs/stage3_token_lm/token_space.json"
        )
    report, report_path = _read_eval_report(eval_report)
    from .card import write_model_card

    with _Sha256Jobs() as hashing:
        # the source's sha256 (a provenance fact) is computed on a worker thread while the rows are loaded,
        # checked and written
        source_sha256 = hashing.file(pt_path, progress)
        ckpt = read_legacy(pt_path)
        _check_token_space(ckpt, space)

        rows = {INPUT_ROWS_KEY: ckpt.embeddings}
        if ckpt.lm_head is not None:
            rows[OUTPUT_ROWS_KEY] = ckpt.lm_head
        names = {INPUT_ROWS_KEY: "embeddings", OUTPUT_ROWS_KEY: "lm_head"}
        for key, tensor in rows.items():
            _check_finite(names[key], tensor, ckpt.row_start, pt_path, allow_nonfinite)
        out_dtype = out_dtype or ckpt.dtype
        rows = _storable(rows, out_dtype)
        if out_dtype != ckpt.dtype:
            for key, tensor in rows.items():
                what = f"{names[key]} cast to {_dtype_name(out_dtype)}"
                _check_finite(what, tensor, ckpt.row_start, pt_path, allow_nonfinite)

        lora = None
        if lora_dir is not None:
            lora = read_legacy_lora(os.fspath(lora_dir), rows, space.text_vocab_size)
        config = RowExtensionConfig(
            token_space=space,
            base_model_name_or_path=base_model or ckpt.base_llm,
            head_rows="trained" if ckpt.lm_head is not None else "mean",
            lora_adapter=LORA_ADAPTER_NAME if lora else None,
        )
        rows_bytes = sum(t.numel() * t.element_size() for t in rows.values())

        with _atomic_output(target, overwrite=overwrite, marker=ADAPTER_CONFIG_NAME, protected=(checkpoint,)) as tmp:
            config.save_pretrained(tmp)
            weights_path = os.path.join(tmp, WEIGHTS_NAME)
            metadata = {"format": "pt"}
            with _bar(rows_bytes, f"writing {WEIGHTS_NAME}", progress) as bar:
                predicted = _hash_as_safetensors(rows, metadata, hashing)  # hashed while being written
                save_file(rows, weights_path, metadata=metadata)
                weights_sha256 = _verify_safetensors(weights_path, rows, bar, hashing, predicted)  # a future
            if lora:
                write_lora(os.path.join(tmp, LORA_ADAPTER_NAME), *lora)
            provenance = {
                "source_checkpoint": os.path.normpath(os.fspath(checkpoint_dir)),
                "source_sha256": source_sha256.result(),
                "source_format": LEGACY_PT_NAME,
                "row_start": ckpt.row_start,
                "row_end": ckpt.row_end,
                "dtype": _dtype_name(out_dtype),
            }
            if out_dtype != ckpt.dtype:
                provenance["source_dtype"] = _dtype_name(ckpt.dtype)
            if config.base_model_name_or_path != ckpt.base_llm:
                provenance["source_base_llm"] = ckpt.base_llm
            if report_path:
                provenance["eval_report"] = report_path
            if lora_dir is not None:
                provenance["source_lora"] = os.path.normpath(os.fspath(lora_dir))
            # the card (README.md) records the rows' size and sha256, the provenance and the eval numbers
            write_model_card(
                tmp, config, provenance=provenance, eval_report=report, carry_over=False,
                weights_sha256=weights_sha256.result,  # awaited after rendering
            )
    return target


def _storable(rows: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rows in ``dtype``, contiguous, each in a storage of its own: safetensors refuses overlapping views of
    one storage (a tied trainer's lm_head may be the embeddings tensor itself, or a view of the same matrix).
    A tensor is copied only when it is not so already (a view of a larger storage is fine: only its own bytes
    are written)."""
    storable: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in rows.items():
        tensor = tensor.to(dtype)
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        storable[key] = tensor
    return storable


# ---------------------------------------------------------------------------------------- hashing, read-back
_READ_BLOCK = 1 << 20  # read-back comparison: 1 MiB reads, the fastest measured
_MEMORY_BLOCK = 1 << 24  # in-memory hashing: 16 MiB per step (between checks for abandonment)


class _Abandoned(Exception):
    """A hashing job stopped because the conversion it served failed."""


class _Sha256Jobs:
    """sha256 jobs on worker threads: hashlib releases the GIL on large blocks, so they run beside the
    caller's loading, checking and writing. Leaving the ``with`` block (by an error too) stops the jobs still
    running and waits for them: no thread outlives the call."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="uti-peft-sha256")

    def __enter__(self) -> "_Sha256Jobs":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def file(self, path: str, progress: Optional[bool]) -> "Future[str]":
        """The sha256 of a file's bytes (with a ``reading NAME`` progress bar); not abandoned midway."""
        return self._pool.submit(file_sha256, path, progress=progress)

    def buffers(self, buffers: list[memoryview]) -> "Future[str]":
        """The sha256 of the concatenation of ``buffers`` (memory that must not change meanwhile)."""
        return self._pool.submit(self._buffers, buffers)

    def _check(self) -> None:
        if self._stop.is_set():
            raise _Abandoned

    def _buffers(self, buffers: list[memoryview]) -> str:
        digest = hashlib.sha256()
        for buffer in buffers:
            for start in range(0, len(buffer), _MEMORY_BLOCK):
                self._check()
                digest.update(buffer[start : start + _MEMORY_BLOCK])
        return digest.hexdigest()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the view keeps the tensor alive)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _hash_as_safetensors(
    rows: dict[str, torch.Tensor], metadata: dict[str, str], hashing: _Sha256Jobs
) -> tuple[bytes, "Future[str]"]:
    """Start hashing the file that ``save_file(rows, metadata=metadata)`` is expected to write, before it is
    written: ``(predicted header bytes, future sha256)``. safetensors stores tensors of one dtype in name
    order, behind a compact JSON header padded with spaces to 8 bytes; `_verify_safetensors` uses the
    future only if the header actually written is byte for byte this one."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    position = 0
    for key in sorted(rows):
        tensor = rows[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": codes.get(tensor.dtype, "?"),
            "shape": list(tensor.shape),
            "data_offsets": [position, position + nbytes],
        }
        position += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, hashing.buffers([memoryview(prefix), *(_byte_view(rows[key]) for key in sorted(rows))])


def _verify_safetensors(
    path: str,
    rows: dict[str, torch.Tensor],
    bar: tqdm,
    hashing: _Sha256Jobs,
    predicted: Optional[tuple[bytes, "Future[str]"]] = None,
) -> "Future[str]":
    """Read back a safetensors file just written from ``rows``, or refuse the write: its header must list exactly
    these tensors (dtype, shape, packed offsets), its size must be header + rows, and its data must equal the
    rows' bytes. Returns the file's sha256 as a future: it is hashed on a worker thread, from the header bytes
    read back and the rows in memory (the file's very bytes, as the comparison proves), while the data is
    compared and whatever the caller does next; or, when the header read back is the one ``predicted`` (see
    `_hash_as_safetensors`), it is the hash of these very bytes, started before the file was written."""
    size = os.path.getsize(path)
    differs = f"{path}: read back differs from what was written"
    with open(path, "rb", buffering=0) as f:
        prefix = _read_exact(f, 8)
        if len(prefix) != 8 or struct.unpack("<Q", prefix)[0] > size - 8:
            raise LegacyCheckpointError(f"{differs} (truncated header, {size} bytes)")
        prefix += _read_exact(f, struct.unpack("<Q", prefix)[0])
        try:
            entries = {k: v for k, v in json.loads(prefix[8:]).items() if k != "__metadata__"}
            order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise LegacyCheckpointError(f"{differs} (unreadable header: {exc})") from None
        if set(entries) != set(rows):
            raise LegacyCheckpointError(f"{path}: wrote {sorted(entries)} but expected {sorted(rows)}")
        buffers, position = [], 0
        for key in order:
            tensor, entry = rows[key], entries[key]
            nbytes = tensor.numel() * tensor.element_size()
            if (
                SAFETENSORS_DTYPES.get(entry.get("dtype")) != tensor.dtype
                or entry.get("shape") != list(tensor.shape)
                or entry.get("data_offsets") != [position, position + nbytes]
            ):
                raise LegacyCheckpointError(
                    f"{differs}: {key} is {entry}, expected {list(tensor.shape)} {tensor.dtype}"
                )
            buffers.append(_byte_view(tensor))
            position += nbytes
        if len(prefix) + position != size:
            raise LegacyCheckpointError(
                f"{differs}: {size} bytes, header and rows account for {len(prefix) + position}"
            )
        if predicted is not None and predicted[0] == prefix:
            sha256 = predicted[1]  # the same header, hence the same order of the same rows: the same bytes
        else:
            sha256 = hashing.buffers([memoryview(prefix), *buffers])
        block = bytearray()
        for key, buffer in zip(order, buffers):
            for start in range(0, len(buffer), _READ_BLOCK):
                expected = buffer[start : start + _READ_BLOCK]
                if len(block) != len(expected):
                    block = bytearray(len(expected))
                if _read_exact_into(f, block) != len(block) or block != expected:  # bytearray == view: memcmp
                    raise LegacyCheckpointError(f"{path}: {key} read back differs from what was written")
                bar.update(len(expected))
    return sha256


def _read_exact(f, n: int) -> bytes:
    block = bytearray(n)
    return bytes(block[: _read_exact_into(f, block)])


def _read_exact_into(f, block: bytearray) -> int:
    """Fill ``block`` from ``f`` (an unbuffered file may return short reads); the count read (short at EOF)."""
    view, filled = memoryview(block), 0
    while filled < len(block):
        got = f.readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or dtype == "keep":
        return None
    try:
        return dtype_from_name(dtype)
    except RowExtensionError:
        raise LegacyCheckpointError(f"dtype is {dtype!r}; expected 'keep' or one of {sorted(DTYPES)}") from None


def _verify_written(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str, bar) -> None:
    """Read back what was written: same keys, dtypes and bytes, or the write is refused."""
    if set(written) != set(expected):
        raise LegacyCheckpointError(f"{path}: wrote {sorted(written)} but expected {sorted(expected)}")
    for key, tensor in expected.items():
        if not _same_bytes(written[key], tensor):
            raise LegacyCheckpointError(f"{path}: {key} read back differs from what was written")
        bar.update(tensor.numel() * tensor.element_size())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), the dtype and shape too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


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


# ---------------------------------------------------------------------------------------- inspect
def inspect_checkpoint(
    path: PathLike, *, token_space: Union[None, TokenSpace, dict, PathLike] = None
) -> dict[str, Any]:
    """What a legacy checkpoint or an adapter holds, read from headers and metadata (no model is loaded).

    Unsafe or unreadable files raise; inconsistencies (ranges vs token space, json vs pt) are listed
    under ``problems``.
    """
    path = os.path.normpath(os.fspath(path))
    if os.path.isfile(path) and os.path.basename(path) in (ADAPTER_CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)):
        return _inspect_adapter(path)
    if (os.path.isdir(path) and os.path.isfile(os.path.join(path, LEGACY_PT_NAME))) or os.path.isfile(path):
        return _inspect_legacy(path, token_space)
    raise LegacyCheckpointError(
        f"{path}: neither a legacy checkpoint ({LEGACY_PT_NAME}) nor an adapter directory ({ADAPTER_CONFIG_NAME})"
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
        space = _resolve_token_space(checkpoint, token_space)
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
    tensors: dict[str, str] = {}
    hidden = dtype = None
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shape, dtype = piece.get_shape(), _dtype_name(SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
                tensors[key] = f"{shape} {dtype}"
                hidden = shape[-1] if len(shape) == 2 else hidden
    except Exception as exc:
        problems.append(f"{weights_path}: cannot be read ({exc})")
    text, total = raw.get("text_vocab_size"), raw.get("vocab_size")
    return {
        "format": "PEFT adapter (ROW_EXTENSION)",
        "path": adapter_dir,
        "file_bytes": os.path.getsize(weights_path) if os.path.isfile(weights_path) else None,
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
