"""uti_peft.memory: extending a memory-mapped matrix by mapping its file again (no copy of its rows), copying one
without keeping its pages resident, and telling which tensors still hold a file's bytes (Linux only)."""

from __future__ import annotations

import gc
import hashlib
import sys

import pytest
import torch

import uti_peft.memory as memory
from uti_peft.memory import _file_mapping_of, copy_releasing_source, extended_matrix, map_file_rows, same_file_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps and madvise are Linux's")


def mapped_matrix(path, rows: int = 4096, cols: int = 1024, header: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 matrix written to ``path`` after ``header`` bytes and mapped back privately (as transformers maps
    safetensors, whose header puts tensors at any 8-byte-aligned offset)."""
    values = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    with open(path, "wb") as f:
        f.write(b"h" * header)
        f.write(values.numpy().tobytes())
    nbytes = header + values.numel() * 4
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
    return values, torch.tensor([], dtype=torch.float32).set_(storage, header // 4, values.shape)


@pytest.fixture(params=["scan", "pagemap"])
def page_check(request, monkeypatch):
    """Which way "never written" is asked: the kernel's PAGEMAP_SCAN walk (Linux >= 6.7) or /proc/self/pagemap read
    entry by entry (older kernels). Both must tell the same pages apart."""
    if request.param == "pagemap":
        monkeypatch.setattr(memory, "_scan_for_own_pages", lambda span, pagemap: None)
    else:
        with open("/proc/self/pagemap", "rb") as f:
            span = (id(f), id(f) + 1)
            if memory._scan_for_own_pages(span, f.fileno()) is None:
                pytest.skip("this kernel has no PAGEMAP_SCAN ioctl")
    return request.param


def mapped_ranges() -> set[int]:
    """Start addresses of this process's mappings."""
    return {int(line.split("-")[0], 16) for line in open("/proc/self/maps")}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resident_kb(tensor: torch.Tensor) -> int:
    """Rss of the mapping that holds ``tensor``, from /proc/self/smaps."""
    address, lines = tensor.data_ptr(), open("/proc/self/smaps").read().splitlines()
    for index, line in enumerate(lines):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            if start <= address < end:
                return next(int(x.split()[1]) for x in lines[index + 1 :] if x.startswith("Rss:"))
    raise AssertionError("tensor not in any mapping")


def test_copy_of_a_mapped_matrix_is_exact_and_leaves_it_unmapped(tmp_path):
    values, mapped = mapped_matrix(tmp_path / "weights.bin")
    assert torch.equal(mapped, values)  # touches every page
    assert _file_mapping_of(mapped) is not None
    before = resident_kb(mapped)
    assert before >= mapped.numel() * 4 // 1024

    copy = torch.empty_like(values)
    copy_releasing_source(copy, mapped)
    assert torch.equal(copy, values)
    assert resident_kb(mapped) < before // 8  # the source's pages left this process
    assert torch.equal(mapped, values)  # and read back from the file when touched again


def test_written_mappings_and_anonymous_memory_are_never_released(tmp_path):
    values, mapped = mapped_matrix(tmp_path / "weights.bin")
    mapped[0, 0] = 42.0  # a private copy of that page now exists: releasing it would lose the write
    assert _file_mapping_of(mapped) is None
    copy = torch.empty_like(values)
    copy_releasing_source(copy, mapped)
    assert copy[0, 0] == 42.0 and mapped[0, 0] == 42.0
    assert torch.equal(copy[1:], values[1:])

    anonymous = values.clone()
    assert _file_mapping_of(anonymous) is None
    copy_releasing_source(copy, anonymous)
    assert torch.equal(copy, values) and torch.equal(anonymous, values)


@pytest.mark.parametrize("header", [0, 8, 4096 + 1000], ids=["page-aligned", "8-bytes-in", "mid-page"])
def test_extension_maps_the_kept_rows_from_the_file_without_copying_them(tmp_path, header):
    path = tmp_path / "weights.bin"
    values, mapped = mapped_matrix(path, rows=1000, cols=256, header=header)
    before = sha256(path)
    keep, total = 900, 1300
    extended = map_file_rows(mapped, keep, total)
    assert extended is not None and extended.shape == (total, 256) and extended.is_contiguous()
    text = extended[:keep]
    assert torch.equal(text, values[:keep])
    # the kept rows are the file's own bytes (a clean private mapping of it), at the same offset as the source
    assert same_file_bytes(text, mapped[:keep])
    assert _file_mapping_of(text).path == str(path)
    # placed where address = file offset modulo 2 MiB (as the kernel places file mappings): huge pages can map it
    assert (extended.data_ptr() - header) % (2 << 20) == 0

    new_rows = torch.randn(total - keep, 256, generator=torch.Generator().manual_seed(1))
    extended[keep:] = new_rows  # the page shared with the last kept row gets a private copy, nothing else changes
    assert torch.equal(extended[keep:], new_rows) and torch.equal(extended[:keep], values[:keep])
    extended[0, 0] = 7.0  # a private mapping: the file never changes
    assert sha256(path) == before and torch.equal(mapped, values)

    start = extended.untyped_storage().data_ptr()
    assert start in mapped_ranges()
    del extended, text
    gc.collect()
    assert start not in mapped_ranges()  # the whole range went with the tensor


def test_extension_copies_what_is_not_a_clean_file_mapping(tmp_path, page_check):
    values, mapped = mapped_matrix(tmp_path / "weights.bin", rows=600, cols=128)
    mapped[10, 3] = 42.0  # written: the mapping no longer reads the file there
    assert map_file_rows(mapped, 500, 700) is None
    extended = extended_matrix(mapped, 500, 700)
    assert extended[10, 3] == 42.0 and torch.equal(extended[:500], mapped[:500])
    assert _file_mapping_of(extended[:500]) is None

    anonymous = values.clone()
    assert map_file_rows(anonymous, 500, 700) is None
    assert torch.equal(extended_matrix(anonymous, 500, 700)[:500], values[:500])
    assert map_file_rows(mapped[:, :64], 500, 700) is None  # not contiguous


def test_same_file_bytes_needs_the_same_unwritten_bytes_of_one_file(tmp_path, page_check):
    values, first = mapped_matrix(tmp_path / "weights.bin", rows=600, cols=128)
    _, second = mapped_matrix(tmp_path / "weights.bin", rows=600, cols=128)  # a second mapping of the same file
    _, other_file = mapped_matrix(tmp_path / "copy.bin", rows=600, cols=128)
    assert first.data_ptr() != second.data_ptr()
    assert first.sum() == second.sum()  # read: the pages are in memory now, as the file's own
    assert same_file_bytes(first, second)
    assert same_file_bytes(first[100:200], second[100:200])
    assert not same_file_bytes(first[100:200], second[101:201])  # other rows
    assert not same_file_bytes(first, other_file)  # equal values, but not provably: another file
    assert not same_file_bytes(first, values)  # anonymous memory
    second[599, 127] = 1.0  # written
    assert not same_file_bytes(first, second)
    assert same_file_bytes(first[:500], second[:500])  # the written page is not among these rows
