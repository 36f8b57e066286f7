"""Reading files without loading them: a safetensors header (checked against the file's size), a file's sha256,
and the one table of the floating dtypes uti-peft reads and writes (by name and by safetensors code)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from .constants import DTYPE_NAMES
from .errors import RowExtensionError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# safetensors dtype codes of the floating dtypes a row block or checkpoint tensor may have
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors code


def dtype_from_name(name: Union[str, torch.dtype], what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` (or the dtype itself) -> ``torch.bfloat16``; anything not in `DTYPES` is refused."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    raise RowExtensionError(f"{what} is {name!r}; expected one of {sorted(DTYPES)}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked to account for every byte of the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RowExtensionError(f"{path}: not a safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise RowExtensionError(f"{path}: not a safetensors file (header length {length} > file size {size})")
        header = json.loads(f.read(length))
    data = _tensor_bytes(header)
    if 8 + length + data != size:
        raise RowExtensionError(f"{path}: {size} bytes but header and tensors account for {8 + length + data}")
    return header


def _tensor_bytes(header: dict[str, Any]) -> int:
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")


def rows_bytes_of_file(path: str | os.PathLike) -> int:
    """Bytes of tensor data in a safetensors file (the rows), read from its header without loading it."""
    return _tensor_bytes(read_safetensors_header(path))


def file_sha256(path: str | os.PathLike, *, progress: Optional[bool] = False) -> str:
    """sha256 of a file's bytes, streamed; ``progress=None`` shows a bar on a terminal only."""
    digest = hashlib.sha256()
    bar = tqdm(total=os.path.getsize(path), desc=f"reading {os.path.basename(path)}", unit="B", unit_scale=True,
               disable=None if progress is None else not progress)
    block = bytearray(1 << 20)  # one reused buffer, filled in place: no allocation per block
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f, bar:
        while n := f.readinto(block):
            digest.update(view[:n])
            bar.update(n)
    return digest.hexdigest()


