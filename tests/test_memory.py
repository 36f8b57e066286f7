"""uti_peft.memory: extending a memory-mapped matrix by mapping its file again (no copy of its rows), copying one
without keeping its pages resident, and telling which tensors still hold a file's bytes (Linux only)."""

from __future__ import annotations

import gc
import hashlib
import json
import mmap
import sys

import pytest
import torch

import uti_peft.memory as memory
from safetensors import safe_open
from safetensors.torch import save_file

from uti_peft.memory import (
    _file_mapping_of, copy_releasing_source, extended_matrix, file_bytes_or_copy, file_page_offset, holds_file_bytes,
    map_file_rows, page_aligned_metadata, same_file_bytes, sort_metadata_entries,
)

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


@pytest.fixture(params=["linux-6.11", "linux-6.7", "older"])
def kernel(request, monkeypatch):
    """Which of the kernel's ways the checks take: the ``PROCMAP_QUERY`` ioctl to find a mapping (Linux >= 6.11) and
    the ``PAGEMAP_SCAN`` walk to tell written pages (>= 6.7), only the walk, or neither (the text of /proc/self/maps
    and /proc/self/pagemap read entry by entry). All must tell the same pages apart."""
    if request.param == "linux-6.11":
        with open("/proc/self/maps", "rb", buffering=0) as f:
            if memory._query_mapping(f.fileno(), 0) is memory._NO_QUERY:
                pytest.skip("this kernel has no PROCMAP_QUERY ioctl")
    else:
        monkeypatch.setattr(memory, "_query_mapping", lambda maps, address: memory._NO_QUERY)
    if request.param == "older":
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


def test_extension_copies_what_is_not_a_clean_file_mapping(tmp_path, kernel):
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


def test_a_kept_copy_of_file_bytes_maps_them_again(tmp_path, kernel):
    values, mapped = mapped_matrix(tmp_path / "weights.bin", rows=600, cols=128, header=8)
    kept = file_bytes_or_copy(mapped[500:])
    assert same_file_bytes(kept, mapped[500:])  # nothing read or copied: the same bytes of the file
    assert kept.untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
    mapped[500:] = 0.0  # the source's storage is not the copy's
    assert torch.equal(kept, values[500:])

    written = file_bytes_or_copy(mapped[400:])  # holds written pages: copied, values as they are now
    assert _file_mapping_of(written) is None and torch.equal(written, mapped[400:])
    anonymous = file_bytes_or_copy(values[:10])
    assert torch.equal(anonymous, values[:10]) and anonymous.data_ptr() != values.data_ptr()


def test_same_file_bytes_needs_the_same_unwritten_bytes_of_one_file(tmp_path, kernel):
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


def test_only_private_mappings_of_files_on_disk_count_as_file_bytes(tmp_path, kernel):
    values, private = mapped_matrix(tmp_path / "weights.bin", rows=300, cols=128)
    assert _file_mapping_of(private).path == str(tmp_path / "weights.bin")
    shared = torch.tensor([], dtype=torch.float32).set_(
        torch.UntypedStorage.from_file(str(tmp_path / "weights.bin"), shared=True, nbytes=values.numel() * 4))
    assert shared.numel() == values.numel() and _file_mapping_of(shared) is None  # writes would reach the file
    assert _file_mapping_of(values) is None  # anonymous memory
    (tmp_path / "weights.bin").unlink()  # a deleted file cannot be mapped again
    assert torch.equal(private, values) and _file_mapping_of(private) is None


def test_the_kernels_query_finds_what_the_text_of_proc_maps_says(tmp_path):
    _, private = mapped_matrix(tmp_path / "weights.bin", rows=300, cols=128)
    with open("/proc/self/maps", "rb", buffering=0) as maps:
        if memory._query_mapping(maps.fileno(), 0) is memory._NO_QUERY:
            pytest.skip("this kernel has no PROCMAP_QUERY ioctl")
        lines = list(memory._MAPS_LINE.finditer(open("/proc/self/maps").read()))
        addresses = [private.data_ptr() + 4096, 0]
        addresses += [int(line[key], 16) - (key == "end") for line in lines for key in ("start", "end")]
        found = {address: memory._query_mapping(maps.fileno(), address) for address in addresses}
    assert found == {address: memory._mapping_in_lines(lines, address) for address in addresses}
    assert found[private.data_ptr() + 4096].path == str(tmp_path / "weights.bin")
    assert sum(mapping is not None for mapping in found.values()) > 10  # shared libraries too


def rows_on_shared_page(tensor: torch.Tensor) -> int:
    """How many of ``tensor``'s first rows share a page with the memory before it."""
    return -(-((-tensor.data_ptr()) % mmap.PAGESIZE) // (tensor.shape[1] * tensor.element_size()))


@pytest.mark.parametrize("shift", [0, 8], ids=["same-offset-in-page", "another-offset"])
def test_extension_maps_a_tail_file_at_its_offset_within_a_page(tmp_path, shift, kernel):
    cols, keep, new = 256, 900, 400  # float32 rows of 1,024 bytes: the text rows end 3 KiB into a page
    text_values, text = mapped_matrix(tmp_path / "base.bin", rows=1000, cols=cols, header=1000)
    # the new rows at the offset within a page where the text rows end in memory (and in the base file)
    header = (1000 + keep * cols * 4) % mmap.PAGESIZE + 4096 + shift
    tail_values, tail = mapped_matrix(tmp_path / "rows.bin", rows=new, cols=cols, header=header)
    before = sha256(tmp_path / "rows.bin")

    extended = extended_matrix(text, keep, keep + new, tail=tail)
    assert torch.equal(extended[:keep], text_values[:keep]) and torch.equal(extended[keep:], tail_values)
    shared = rows_on_shared_page(extended[keep:])
    assert 0 < shared < new  # the first new rows share a page with the last text rows: copied there
    mapping = _file_mapping_of(extended[keep + shared :])
    if shift:  # not where a mapping can put them: copied, and still equal
        assert mapping is None and not holds_file_bytes(extended[keep:], tail)
        return
    assert mapping.path == str(tmp_path / "rows.bin")  # the rest maps the file: nothing written
    _, again = mapped_matrix(tmp_path / "rows.bin", rows=new, cols=cols, header=header)
    assert holds_file_bytes(extended[keep:], again)  # a reload of the same bytes can be skipped
    extended[keep, 0] += 1.0  # the shared page (a private copy already) is compared by value
    assert not holds_file_bytes(extended[keep:], again)
    extended[keep, 0] = tail_values[0, 0]
    assert holds_file_bytes(extended[keep:], again)
    extended[keep + new - 1, 0] = 7.0  # written: a private copy of that page, never the file
    assert not holds_file_bytes(extended[keep:], again)
    assert sha256(tmp_path / "rows.bin") == before


@pytest.mark.parametrize("page_offset", [0, 8, 1608, 4088])
def test_page_aligned_metadata_puts_the_anchor_at_the_offset_within_a_page(tmp_path, page_offset):
    tensors = {"a.first": torch.randn(17, 96).to(torch.bfloat16), "b.anchor": torch.randn(300, 96).to(torch.bfloat16)}
    metadata = page_aligned_metadata(tensors, {"format": "pt"}, "b.anchor", page_offset)
    assert metadata["format"] == "pt"
    save_file(tensors, tmp_path / "rows.safetensors", metadata=metadata)

    raw = (tmp_path / "rows.safetensors").read_bytes()
    header_bytes = int.from_bytes(raw[:8], "little")
    offset = 8 + header_bytes + json.loads(raw[8 : 8 + header_bytes])["b.anchor"]["data_offsets"][0]
    assert offset % mmap.PAGESIZE == page_offset
    with safe_open(tmp_path / "rows.safetensors", framework="pt") as f:  # an ordinary safetensors file
        assert all(torch.equal(f.get_tensor(name), tensor) for name, tensor in tensors.items())
        assert f.metadata()["format"] == "pt"

    mixed = {**tensors, "c.other": torch.zeros(3)}  # a layout it does not predict: left as it was
    assert page_aligned_metadata(mixed, {"format": "pt"}, "b.anchor", page_offset) == {"format": "pt"}
    assert page_aligned_metadata(tensors, {"format": "pt"}, "b.anchor", None) == {"format": "pt"}


def test_saves_of_the_same_padded_tensors_are_the_same_bytes(tmp_path):
    # safetensors writes metadata entries in a different order from one save to the next; sorted, saves repeat
    tensors = {"b.anchor": torch.randn(300, 96).to(torch.bfloat16)}
    metadata = page_aligned_metadata(tensors, {"format": "pt"}, "b.anchor", 2048)
    saved = set()
    for attempt in range(8):
        save_file(tensors, tmp_path / f"{attempt}.safetensors", metadata=metadata)
        sort_metadata_entries(tmp_path / f"{attempt}.safetensors")
        saved.add((tmp_path / f"{attempt}.safetensors").read_bytes())
    assert len(saved) == 1
    with safe_open(tmp_path / "0.safetensors", framework="pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("b.anchor"), tensors["b.anchor"])


def test_a_tail_has_a_file_page_offset_only_after_rows_that_map_a_file(tmp_path):
    _, text = mapped_matrix(tmp_path / "base.bin", rows=1000, cols=256, header=1000)
    mapped = extended_matrix(text, 900, 1300)
    assert file_page_offset(mapped[900:]) == (1000 + 900 * 256 * 4) % mmap.PAGESIZE  # the base file's
    assert file_page_offset(extended_matrix(text.clone(), 900, 1300)[900:]) is None  # copied: wherever memory was
    assert file_page_offset(torch.zeros(400, 256)) is None
