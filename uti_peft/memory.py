"""Copying a base matrix out of a memory-mapped checkpoint without keeping the original resident.

transformers loads safetensors weights as views of a private file mapping. When a row-extension layer
builds the extended lm_head, it reads every text row of the base matrix once; those file pages would then
stay counted in the process's memory for as long as the mapping lives (that is, as long as any other
weight of the checkpoint does), next to the extended copy: a model using twice the memory of a merged one.
`copy_releasing_source` drops each copied chunk's pages from the process right after copying it.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional

import torch

_COPY_CHUNK_BYTES = 64 << 20
_MADV_DONTNEED = 4  # Linux


def copy_releasing_source(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` along dim 0 in chunks; if ``src`` lives in a file mapping, each copied chunk's
    pages are released (`release_file_pages`), so source and copy are never both fully resident."""
    mapping = _file_mapping_of(src)
    rows_per_chunk = max(1, _COPY_CHUNK_BYTES // max(1, src[:1].numel() * src.element_size()))
    for start in range(0, src.shape[0], rows_per_chunk):
        chunk = src[start : start + rows_per_chunk]
        dst[start : start + rows_per_chunk].copy_(chunk)
        if mapping is not None:
            release_file_pages(chunk, mapping)


def release_file_pages(tensor: torch.Tensor, mapping: tuple[int, int]) -> None:
    """Drop the whole pages inside ``tensor``'s bytes from this process (``madvise(MADV_DONTNEED)``).

    Only for a contiguous tensor inside ``mapping`` (a file mapping, see `_file_mapping_of`): its values are
    unchanged, the kernel reads them back from the file if they are touched again. Pages that ``tensor``
    shares with its neighbours in the file are left alone.
    """
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if not tensor.is_contiguous() or first >= last or not (mapping[0] <= first and last <= mapping[1]):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))


def _file_mapping_of(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """The ``(start, end)`` address range of the file mapping holding ``tensor``, if it is in one (Linux, CPU).

    Private mappings qualify only if no page of theirs was written by this process (smaps counts such
    copy-on-write pages as ``Anonymous``): releasing a written page would bring back the file's version.
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    address = tensor.data_ptr()
    try:
        with open("/proc/self/smaps", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    headers = [i for i, line in enumerate(lines) if _is_header(line)] + [len(lines)]
    for index, next_index in zip(headers, headers[1:]):
        fields = lines[index].split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if not start <= address < end:
            continue
        file_backed = len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
        written = [line.split()[1] for line in lines[index + 1 : next_index] if line.startswith("Anonymous:")]
        return (start, end) if file_backed and written == ["0"] else None
    return None


def _is_header(line: str) -> bool:
    first = line.split(maxsplit=1)[0] if line.strip() else ""
    return "-" in first and ":" not in first
