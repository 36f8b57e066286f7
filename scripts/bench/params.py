"""What a benchmark run depends on: the model and token-space shape, the run parameters, the work-dir layout.

The parent writes ``Params`` to the work dir (``bench_params.json``) and every case process reads it back, so both
sides agree on one description of the run; ``bench.json`` echoes the same dictionary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

DTYPE = torch.bfloat16
# PEFT's own ways of training the new rows (issue #26): TrainableTokens on the new ids, and LoRA with the whole
# embedding and lm_head in modules_to_save; each saved once in the work dir (``Paths.peer``)
PEERS = ("trainable-tokens", "lora-modules-to-save")
DTYPE_BYTES = 2
MB = 1_000_000
PARAMS_NAME = "bench_params.json"


@dataclass(frozen=True)
class Shape:
    """Model and token-space sizes. The defaults are Qwen3-8B's embedding and decoder-layer shapes."""

    vocab_rows: int = 151_936  # rows of the base embedding / lm_head (Qwen3 pads the 151,669 text ids)
    hidden: int = 4_096
    layers: int = 1
    intermediate: int = 12_288
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    text_vocab: int = 151_669
    special: int = 64
    image: int = 8_192
    codebooks: int = 4
    codebook_size: int = 1_024
    tied: bool = False  # Qwen3-8B is untied; the peers are also measured on a tied base of the same widths

    @property
    def new_rows(self) -> int:
        return self.special + self.image + self.codebooks * self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.new_rows


# the sizes of uti_peft.tiny.build_tiny_qwen3() / tiny_token_space()
QUICK_SHAPE = Shape(
    vocab_rows=1_024, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16,
    text_vocab=1_000, image=256, codebook_size=64,
)


@dataclass(frozen=True)
class Params:
    """Everything a measurement depends on; written to the work dir for the child processes and to bench.json."""

    shape: Shape
    reps: int
    prefill_tokens: int
    decode_steps: int
    train_seq_len: int
    train_steps: int
    legacy_timeout: float
    quick: bool
    full_warmup: bool = False
    seed: int = 0
    dtype: str = "bfloat16"
    load_probe_tokens: int = 128
    warm_forwards: int = 5  # forwards timed after each load: the first is part of "load + first forward"
    load_reps: int = 7  # repetitions of each load case of the sweep (ours and merged alternating)
    depths: tuple[int, ...] = (1, 4, 8)  # decoder-layer counts of the load sweep; the first is shape.layers
    merge_layers: tuple[int, ...] = (1, 4)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (bench_params.json, bench.json's ``parameters``), with the derived sizes added."""
        data = asdict(self)
        data["shape"]["new_rows"] = self.shape.new_rows
        data["shape"]["vocab_size"] = self.shape.vocab_size
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Params":
        """Read back ``to_dict``'s output (the derived sizes are dropped: they follow from the shape)."""
        shape = {k: v for k, v in data["shape"].items() if k not in ("new_rows", "vocab_size")}
        tuples = {key: tuple(data[key]) for key in ("depths", "merge_layers")}
        return cls(**{**data, **tuples, "shape": Shape(**shape)})


def tied_params(params: Params) -> Params:
    """The run's parameters on a base whose lm_head is its input embedding (the peers' tied comparison)."""
    return replace(params, shape=replace(params.shape, tied=True))


@dataclass(frozen=True)
class Paths:
    """The artifacts in the work directory."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / PARAMS_NAME

    @property
    def token_space(self) -> Path:
        return self.root / "token_space.json"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def legacy(self) -> Path:
        return self.root / "legacy"

    @property
    def legacy_pt(self) -> Path:
        return self.legacy / "trainable_rows.pt"

    @property
    def tied(self) -> "Paths":
        """The artifacts of the tied variant (`tied_params`): its own base, adapter, merged and legacy checkpoints
        and peers, in a work dir of their own inside this one."""
        return Paths(self.root / "tied")

    def peer(self, kind: str) -> Path:
        """The adapter of one of PEFT's own ways (``PEERS``), made on the resized base."""
        return self.root / f"peer-{kind}"

    def scratch(self, name: str) -> Path:
        return self.root / "scratch" / name

    def base_of(self, params: "Params", layers: int) -> Path:
        """The base with ``layers`` decoder layers (the main base when the layer counts agree)."""
        return self.base if layers == params.shape.layers else self.root / f"base-{layers}L"

    def adapter_of(self, params: "Params", layers: int) -> Path:
        """The adapter as saved from the ``layers``-layer base (the main adapter when the layer counts agree): the
        same rows, its file laid out for that base's checkpoint, as a user's adapter is for the base it was trained
        on (uti_peft.memory.page_aligned_metadata)."""
        return self.adapter if layers == params.shape.layers else self.root / f"adapter-{layers}L"

    def merged_of(self, params: "Params", layers: int) -> Path:
        """The merged checkpoint of the ``layers``-layer base (the main one when the layer counts agree)."""
        return self.merged if layers == params.shape.layers else self.root / f"merged-{layers}L"
