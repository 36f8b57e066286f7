"""The base a source is checked against: its directory, config, stored tensors (headers only) and the names of its
embedding and lm_head weights, read as `uti_peft.merge` reads a base (nothing instantiated, no weight loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from ..errors import ExtractError
from ..merge import BASE_FILES, StoredTensor, module_names, read_base_checkpoint, resolve_dir
from ..output import PathLike

BLOCK = 16 << 20  # bytes compared (or rows read) at a time
Rows = Callable[[int, int], torch.Tensor]  # rows [start, stop) of a matrix, read on demand


@dataclass
class Base:
    """The base checkpoint: directory, config, tensors, and the names of its embedding / untied lm_head weights."""

    dir: str
    config: Any
    stored: dict[str, StoredTensor]
    embed: str
    head: Optional[str]  # None when tied (or headless)
    head_name: Optional[str]  # the lm_head weight's name, tied or not (None: headless)
    model: torch.nn.Module  # on the meta device

    def rows(self, name: str) -> Rows:
        return stored_rows(self.stored[name], name)


def stored_rows(item: StoredTensor, name: str) -> Rows:
    """Rows of the stored matrix ``name``, read from its shard when asked for (never the whole matrix)."""
    def rows(start: int, stop: int) -> torch.Tensor:
        with safe_open(item.shard, framework="pt") as st:
            return st.get_slice(name)[start:stop]

    return rows


def read_base(base: PathLike) -> Base:
    """BASE (a directory or Hub id) read and checked: it must hold its embedding (and untied lm_head) weights."""
    base_dir = resolve_dir(base, "base", BASE_FILES)
    config, stored, model = read_base_checkpoint(base_dir)
    embed, head_name, tied = module_names(model)
    head = None if tied else head_name
    if tied:
        stored.pop(head_name, None)  # a tied head stored anyway: the embedding is the matrix
    for name in filter(None, (embed, head)):
        if name not in stored:
            raise ExtractError(f"base {base_dir!r}: the checkpoint holds no {name!r}")
    return Base(base_dir, config, stored, embed, head, head_name, model)
