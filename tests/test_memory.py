"""uti_peft.memory: copying a memory-mapped matrix without keeping its pages resident (Linux only)."""

from __future__ import annotations

import sys

import pytest
import torch

from uti_peft.memory import _file_mapping_of, copy_releasing_source

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps and madvise are Linux's")


def mapped_matrix(path, rows: int = 4096, cols: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 matrix written to ``path`` and mapped back privately (as transformers maps safetensors)."""
    values = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    values.numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=values.numel() * 4)
    return values, torch.tensor([], dtype=torch.float32).set_(storage, 0, values.shape)


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
