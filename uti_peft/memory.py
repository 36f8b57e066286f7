"""Extending a base matrix that transformers memory-mapped from its checkpoint, without copying its rows.

transformers loads safetensors weights as views of a private file mapping: a merged checkpoint's 164,021-row
lm_head costs nothing at load, its pages are read from the page cache when the first forward touches them. An
extended head built by allocating 164,021 fresh rows and copying 151,669 of them would instead fault in and write
1.24 GB at load, and hold the source's pages next to the copy. `extended_matrix` avoids both where it can: the text
rows become a second private mapping of the very same file bytes, with anonymous memory right after them for the
new rows, in one contiguous range. Only the new rows are ever written. Elsewhere (not Linux, not on the CPU, a
weight that is not a clean file mapping) the rows are copied, releasing the source's pages as they are copied.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import re
import struct
import sys
from typing import Any, Callable, NamedTuple, Optional

import torch

_COPY_CHUNK_BYTES = 64 << 20
_MADV_DONTNEED = 4  # Linux
_MAP_FIXED = 0x10  # Linux, every architecture
_HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB pages)


class _FileMapping(NamedTuple):
    """One line of /proc/self/maps: an address range mapping ``path`` from byte ``offset`` on."""

    start: int
    end: int
    offset: int
    device: tuple[int, int]
    inode: int
    path: str


def extended_matrix(weight: torch.Tensor, keep_rows: int, total_rows: int,
                    tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A new contiguous ``[total_rows, weight.shape[1]]`` tensor whose first ``keep_rows`` rows equal
    ``weight[:keep_rows]`` and whose other rows equal ``tail`` (left unspecified for the caller to fill when it is
    None).

    The kept rows are a private mapping of the checkpoint file when ``weight`` is one (`map_file_rows`), and so are
    the tail rows where ``tail`` is a file's bytes at the same offset within a page; anything else is copied
    (`copy_releasing_source`). ``weight`` and ``tail`` themselves are not changed either way.
    """
    extended = map_file_rows(weight, keep_rows, total_rows, tail)
    if extended is None:
        extended = torch.empty((total_rows, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        copy_releasing_source(extended[:keep_rows], weight[:keep_rows])
        if tail is not None:
            copy_releasing_source(extended[keep_rows:], tail)
    return extended


def map_file_rows(weight: torch.Tensor, keep_rows: int, total_rows: int,
                  tail: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """`extended_matrix` without a copy of the kept rows: one address range whose first ``keep_rows`` rows map the
    file bytes behind ``weight`` (private, copy-on-write) and whose rest is anonymous memory, holding ``tail``'s
    values when given (`_fill_tail`). None where that cannot be done (not Linux, not CPU, not contiguous, not a clean
    private file mapping, the file replaced since, ``mmap`` refused).

    The range is reserved as one anonymous ``mmap.mmap`` (which unmaps all of it when the tensor's storage is freed)
    and the file is mapped over its head with ``MAP_FIXED``. Mappings start at page boundaries; the tensor starts as
    far into the first page as the weight starts into its file page, so the last text page holds the first new rows
    too: writing them gives that page a private copy, as writing any row of a private mapping does.
    """
    if not weight.is_contiguous() or keep_rows > weight.shape[0]:
        return None
    source = _file_mapping_of(weight)
    if source is None:
        return None
    page, row_bytes = mmap.PAGESIZE, weight.shape[1] * weight.element_size()
    file_offset = source.offset + weight.data_ptr() - source.start
    lead = file_offset % page
    text_bytes = _round_up(lead + keep_rows * row_bytes, page)
    # one huge page of slack: the file is mapped where address = file offset modulo 2 MiB, as the kernel places
    # file mappings itself, so that the page cache's huge pages can be mapped whole
    region = mmap.mmap(-1, _HUGE_PAGE + _round_up(lead + total_rows * row_bytes, page), flags=mmap.MAP_PRIVATE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = (file_offset - lead - whole.data_ptr()) % _HUGE_PAGE
    if text_bytes and not _map_file_over(whole.data_ptr() + start, text_bytes, source, file_offset - lead):
        return None
    rows = whole[start + lead : start + lead + total_rows * row_bytes].view(weight.dtype)
    extended = rows.view(total_rows, weight.shape[1])
    if tail is not None:
        _fill_tail(extended[keep_rows:], tail)
    return extended


def file_bytes_or_copy(matrix: torch.Tensor) -> torch.Tensor:
    """A matrix of its own with ``matrix``'s values, kept apart from its storage: a new private mapping of the same
    file bytes where ``matrix`` is a clean file mapping (nothing read, written or allocated, and the old storage can
    go), else a clone."""
    mapped = map_file_rows(matrix, matrix.shape[0], matrix.shape[0]) if matrix.dim() == 2 else None
    return matrix.clone() if mapped is None else mapped


def _fill_tail(rows: torch.Tensor, tail: torch.Tensor) -> None:
    """Give ``rows`` (fresh memory of a range `map_file_rows` reserved) ``tail``'s values. Where ``tail`` is a clean
    file mapping whose bytes sit at the offset within a page that ``rows`` has in memory (an adapter file laid out by
    `page_aligned_metadata`), the whole pages of ``rows`` become a private mapping of those file bytes, and only the
    bytes on the page it shares with the text rows are copied: nothing is allocated or written for the rest, and a
    later load of the same file bytes is provably a no-op (`holds_file_bytes`). Anything else is copied."""
    page = mmap.PAGESIZE
    source = None
    if tail.dtype == rows.dtype and tail.shape == rows.shape and tail.is_contiguous():
        source = _file_mapping_of(tail)
    if source is not None:
        file_offset = source.offset + tail.data_ptr() - source.start
        shared = (-rows.data_ptr()) % page  # bytes of ``rows`` on the page it shares with the rows before it
        nbytes = rows.numel() * rows.element_size()
        aligned = (rows.data_ptr() - file_offset) % page == 0 and shared < nbytes
        if aligned and _map_file_over(rows.data_ptr() + shared, _round_up(nbytes - shared, page), source,
                                      file_offset + shared):
            rows.view(-1).view(torch.uint8)[:shared].copy_(tail.view(-1).view(torch.uint8)[:shared])
            return
    copy_releasing_source(rows, tail)


def page_aligned_metadata(tensors: dict[str, torch.Tensor], metadata: dict[str, str], anchor: str,
                          page_offset: Optional[int]) -> dict[str, str]:
    """``metadata`` for ``safetensors``' ``save_file(tensors, ..., metadata=...)``, padded so that tensor ``anchor``
    starts in the file ``page_offset`` bytes into a page.

    For an adapter's rows that offset is where its head rows sit in memory when the head maps the base checkpoint
    (`file_page_offset`), or, for a writer that knows the base but no model, where they would (``extract``): loading
    the file onto that base then maps them instead of copying them (`_fill_tail`). The padding is spaces in one more
    metadata entry; the tensors and their order are unchanged. With no ``page_offset`` (a head that maps no file:
    the offset would be wherever memory happened to be, and the file's bytes would differ from one save to the
    next), or where the layout cannot be predicted (mixed or unknown dtypes, ``anchor`` absent, an offset safetensors'
    8-byte alignment cannot reach), the metadata is returned as it is: the file then loads with a copy.
    """
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if page_offset is None or anchor not in tensors or len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
        return metadata
    page, dtype = mmap.PAGESIZE, _SAFETENSORS_DTYPES[next(iter(dtypes))]
    header: dict[str, Any] = {"__metadata__": {**metadata, _PAGE_PAD_KEY: ""}}
    offset = anchor_offset = 0
    for name in sorted(tensors):  # safetensors orders tensors of one dtype by name
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        anchor_offset = offset if name == anchor else anchor_offset
        offset += size
    unpadded = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    # the data starts after the 8-byte length and the header, which safetensors pads to a multiple of 8
    wanted = (page_offset - 8 - anchor_offset) % page
    if wanted % 8:
        return metadata
    header_bytes = unpadded + (wanted - unpadded) % page
    return {**metadata, _PAGE_PAD_KEY: " " * (header_bytes - unpadded)}


def sort_metadata_entries(path: str | os.PathLike) -> None:
    """Rewrite the header of the safetensors file at ``path`` with its metadata entries in sorted order.

    safetensors writes the metadata from a Rust ``HashMap``, in an order that changes from one save to the next: with
    the padding entry of `page_aligned_metadata` beside ``format``, two saves of the same tensors would differ in
    bytes (a new Hub commit for the same adapter, a file hash that never repeats). The sorted header has the same
    length, so only those bytes change; a header this cannot reproduce exactly is left as it is."""
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        metadata = header.get("__metadata__") or {}
        if len(metadata) < 2:
            return
        ordered = {**header, "__metadata__": dict(sorted(metadata.items()))}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length and json.loads(text) == header:
            file.seek(8)
            file.write(text.ljust(length))


def file_page_offset(tail: torch.Tensor) -> Optional[int]:
    """How far into a page ``tail`` starts, where that is a file's offset: ``tail`` is the tail of a matrix whose
    rows before it are a clean mapping of a file (a head built by `map_file_rows`), so the offset is the base
    checkpoint's, the same in every process. None otherwise."""
    page, before = mmap.PAGESIZE, tail.storage_offset() * tail.element_size()
    if tail.device.type != "cpu" or before < page:
        return None
    text_page = torch.empty(0, dtype=torch.uint8).set_(tail.untyped_storage(), before - page, (8,))
    return tail.data_ptr() % page if _file_mapping_of(text_page) is not None else None


_PAGE_PAD_KEY = "uti_peft.page_padding"
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def _map_file_over(address: int, length: int, source: _FileMapping, offset: int) -> bool:
    """Map ``length`` bytes of ``source``'s file from ``offset`` privately at ``address`` (inside a range this
    process reserved). False when the file is no longer the one mapped (replaced, or changed device/inode) or the
    kernel refuses."""
    try:
        fd = os.open(source.path, os.O_RDONLY)
    except OSError:
        return False
    try:
        stat = os.fstat(fd)
        if (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino) != (*source.device, source.inode):
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        flags = mmap.MAP_PRIVATE | _MAP_FIXED
        mapped = libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
        return mapped == address
    finally:
        os.close(fd)


def copy_releasing_source(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` along dim 0 in chunks; if ``src`` lives in a file mapping, each copied chunk's
    pages are released (`release_file_pages`), so source and copy are never both fully resident."""
    source = _file_mapping_of(src)
    mapping = None if source is None else (source.start, source.end)
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


def same_file_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` provably hold the same values because both are the same bytes of the same file:
    contiguous, of one dtype and shape, each in a private mapping of that file that this process never wrote
    (so each still reads the file), at the same offset in it."""
    if a.dtype != b.dtype or a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
        return False
    mappings = _file_mappings([a, b])
    if None in mappings:
        return False
    (a_map, b_map), offsets = mappings, [m.offset + t.data_ptr() - m.start for m, t in zip(mappings, (a, b))]
    return (a_map.device, a_map.inode) == (b_map.device, b_map.inode) and offsets[0] == offsets[1]


def holds_file_bytes(tensor: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``tensor`` provably holds ``source``'s values, ``source`` being a file's bytes: from its first whole
    page on, ``tensor`` is the same bytes of the same file (`same_file_bytes`), and the rows before, which share a
    page with other memory (`_fill_tail`), are equal by value."""
    if tensor.dim() != 2 or tensor.shape != source.shape or tensor.dtype != source.dtype or tensor.numel() == 0:
        return False
    if tensor.device.type != "cpu" or source.device.type != "cpu":
        return False
    row_bytes = tensor.shape[1] * tensor.element_size()
    shared_rows = -(-((-tensor.data_ptr()) % mmap.PAGESIZE) // row_bytes)
    if shared_rows >= tensor.shape[0] or not torch.equal(tensor[:shared_rows], source[:shared_rows]):
        return False
    return same_file_bytes(tensor[shared_rows:], source[shared_rows:])


def _file_mapping_of(tensor: torch.Tensor) -> Optional[_FileMapping]:
    """The file mapping holding ``tensor``, if it is a private one in which this process wrote none of the tensor's
    pages (so its values are the file's bytes); Linux, CPU."""
    return _file_mappings([tensor])[0]


def _file_mappings(tensors: list[torch.Tensor]) -> list[Optional[_FileMapping]]:
    """`_file_mapping_of` for each tensor, with one open of /proc/self/maps and of /proc/self/pagemap."""
    spans = [_byte_span(t) for t in tensors]
    if sys.platform != "linux" or sys.byteorder != "little" or not any(spans):
        return [None] * len(tensors)
    try:
        with open("/proc/self/maps", "rb", buffering=0) as maps, open("/proc/self/pagemap", "rb", buffering=0) as pages:
            mapping_at = _mapping_finder(maps.fileno())
            return [_clean_mapping(span, mapping_at(span[0]), pages.fileno()) if span else None for span in spans]
    except OSError:  # nothing provable: the callers copy
        return [None] * len(tensors)


def _byte_span(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """The ``[first, end)`` addresses of a contiguous, non-empty CPU tensor's bytes."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    return tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()


def _clean_mapping(span: tuple[int, int], mapping: Optional[_FileMapping], pagemap: int) -> Optional[_FileMapping]:
    """``mapping`` (the private file mapping at ``span``'s first byte) if it holds all of ``span`` and none of the
    span's pages was written by this process."""
    if mapping is None or span[1] > mapping.end or not _never_written(span, pagemap):
        return None
    return mapping


def _mapping_finder(maps: int) -> Callable[[int], Optional[_FileMapping]]:
    """A lookup of the private file mapping holding an address (None where the address is in no mapping, or in one
    that is anonymous, shared or of a deleted file): the kernel's ``PROCMAP_QUERY`` ioctl on /proc/self/maps
    (Linux >= 6.11), which finds the one mapping asked for, else the text of /proc/self/maps, read and parsed whole
    (1–3 ms in a process that has imported torch and transformers)."""
    if _query_mapping(maps, 0) is not _NO_QUERY:
        return functools.partial(_query_mapping, maps)
    with open("/proc/self/maps", encoding="utf-8") as f:
        lines = list(_MAPS_LINE.finditer(f.read()))
    return functools.partial(_mapping_in_lines, lines)


class _ProcmapQuery(ctypes.Structure):
    """``struct procmap_query`` of linux/fs.h (the ``PROCMAP_QUERY`` ioctl, Linux >= 6.11)."""

    _fields_ = [
        *((name, ctypes.c_uint64) for name in (
            "size", "query_flags", "query_addr", "vma_start", "vma_end", "vma_flags", "vma_page_size", "vma_offset",
            "inode")),
        *((name, ctypes.c_uint32) for name in ("dev_major", "dev_minor", "vma_name_size", "build_id_size")),
        ("vma_name_addr", ctypes.c_uint64), ("build_id_addr", ctypes.c_uint64),
    ]


_PROCMAP_QUERY = (3 << 30) | (ctypes.sizeof(_ProcmapQuery) << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17, ...)
_PROCMAP_QUERY_VMA_SHARED = 0x08
_NO_QUERY = object()  # the kernel has no PROCMAP_QUERY
_PATH_MAX = 4096  # Linux


def _query_mapping(maps: int, address: int) -> Any:
    """`_mapping_finder`'s lookup asked of the kernel: the mapping holding ``address``, None, or ``_NO_QUERY``."""
    name = ctypes.create_string_buffer(_PATH_MAX + len(" (deleted)"))
    query = _ProcmapQuery(size=ctypes.sizeof(_ProcmapQuery), query_addr=address,
                          vma_name_size=len(name), vma_name_addr=ctypes.addressof(name))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ioctl(maps, ctypes.c_ulong(_PROCMAP_QUERY), ctypes.byref(query)) != 0:
        # no mapping holds the address, or its path is too long to name (then it is not mapped again)
        return None if ctypes.get_errno() in (errno.ENOENT, errno.ENAMETOOLONG) else _NO_QUERY
    path = name.value.decode("utf-8", "surrogateescape") if query.vma_name_size else ""
    if query.vma_flags & _PROCMAP_QUERY_VMA_SHARED or query.inode == 0:
        return None
    return _file_mapping(query.vma_start, query.vma_end, query.vma_offset, (query.dev_major, query.dev_minor),
                         query.inode, path)


def _mapping_in_lines(lines: list[re.Match], address: int) -> Optional[_FileMapping]:
    """`_mapping_finder`'s lookup in the parsed lines of /proc/self/maps."""
    for line in lines:
        start, end = int(line["start"], 16), int(line["end"], 16)
        if start <= address < end:
            break
    else:
        return None
    if line["perms"][3] != "p" or line["inode"] == "0":
        return None
    return _file_mapping(start, end, int(line["offset"], 16), (int(line["major"], 16), int(line["minor"], 16)),
                         int(line["inode"]), line["path"])


def _file_mapping(start: int, end: int, offset: int, device: tuple[int, int], inode: int,
                  path: str) -> Optional[_FileMapping]:
    """A private mapping of an inode, kept where it can be named to be mapped again: a file still on disk."""
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    return _FileMapping(start, end, offset, device, inode, path)


def _never_written(span: tuple[int, int], pagemap: int) -> bool:
    """Whether no page of ``span`` (in a private file mapping) is this process's own copy: each is either not in
    memory or the file's page-cache page. Asked of the kernel's page-table walk (`_scan_for_own_pages`) where it
    has one, else read entry by entry from /proc/self/pagemap: in each 64-bit entry bit 63 says present, 62 swapped
    (only private copies swap) and 61 file page."""
    found = _scan_for_own_pages(span, pagemap)
    if found is not None:
        return not found
    page = mmap.PAGESIZE
    first, last = span[0] // page, (span[1] - 1) // page
    entries = bytearray((last - first + 1) * 8)
    if os.preadv(pagemap, [entries], first * 8) != len(entries):
        return False
    top_bits = torch.frombuffer(entries, dtype=torch.uint8)[7::8] >> 5  # little-endian: bits 61..63 of each entry
    return not bool(((top_bits != 0) & (top_bits != 0b101)).any())  # absent, or present as a file page


class _PageScan(ctypes.Structure):
    """``struct pm_scan_arg`` of linux/fs.h (the ``PAGEMAP_SCAN`` ioctl, Linux >= 6.7)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask")]


class _PageRegion(ctypes.Structure):
    """``struct page_region`` of linux/fs.h: one run of pages ``PAGEMAP_SCAN`` matched."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_PAGE_IS_FILE, _PAGE_IS_PRESENT, _PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PageScan) << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, pm_scan_arg)


def _scan_for_own_pages(span: tuple[int, int], pagemap: int) -> Optional[bool]:
    """Whether any page of ``span`` is present but not a file page, or swapped (the process's own copy), asked
    with one ``PAGEMAP_SCAN`` ioctl: the kernel walks the page tables and skips what was never faulted in, where
    reading /proc/self/pagemap copies out 8 bytes per page (a 1.24 GB head: 2.4 MB). None where the kernel has no
    such ioctl."""
    page = mmap.PAGESIZE
    found = _PageRegion()
    scan = _PageScan(
        size=ctypes.sizeof(_PageScan), start=span[0] // page * page, end=_round_up(span[1], page),
        vec=ctypes.addressof(found), vec_len=1,
        category_inverted=_PAGE_IS_FILE, category_mask=_PAGE_IS_FILE,  # not a file page ...
        category_anyof_mask=_PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,  # ... and in memory or swapped
        return_mask=_PAGE_IS_FILE | _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,
    )
    libc = ctypes.CDLL(None, use_errno=True)
    matched = libc.ioctl(pagemap, ctypes.c_ulong(_PAGEMAP_SCAN), ctypes.byref(scan))
    return None if matched < 0 else matched > 0


# "start-end perms offset major:minor inode [path]", one line per mapping
_MAPS_LINE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>\S+) (?P<offset>[0-9a-f]+) "
    r"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+) (?P<inode>\d+) *(?P<path>.*)$",
    re.MULTILINE,
)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
