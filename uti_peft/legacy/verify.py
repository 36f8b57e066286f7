"""Hashing the rows as they will be written and reading the written file back, so conversion proves its output
byte for byte without a second pass over the data."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from ..errors import LegacyCheckpointError, RowExtensionError
from ..files import DTYPES, SAFETENSORS_CODES, SAFETENSORS_DTYPES, dtype_from_name, file_sha256

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
    header: dict[str, Any] = {"__metadata__": metadata}
    position = 0
    for key in sorted(rows):
        tensor = rows[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": SAFETENSORS_CODES.get(tensor.dtype, "?"),
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
