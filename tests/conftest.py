"""Shared fixtures: tiny Qwen3 bases, saved adapters and the legacy loader's patching, built locally."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import uti_peft
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

TEXT_VOCAB = 1000  # tiny_token_space().text_vocab_size
BASE_ROWS = 1024  # more rows than the text vocab, like Qwen3's 151,936 vs 151,669


@pytest.fixture(scope="session")
def token_space() -> uti_peft.TokenSpace:
    return tiny_token_space()


def probe_ids(space: uti_peft.TokenSpace, length: int = 48, seed: int = 0) -> torch.Tensor:
    """A batch of 2 sequences holding the first and last id of every range plus random ids from all of them."""
    edges = [i for r in space.ranges.values() for i in (r.start, r.end)]
    generator = torch.Generator().manual_seed(seed)
    rest = torch.randint(0, space.vocab_size, (2 * length - len(edges),), generator=generator).tolist()
    return torch.tensor(edges + rest).view(2, length)


def legacy_patch(model, space, input_rows: torch.Tensor, output_rows: torch.Tensor | None, *, mean_resizing=False):
    """The legacy loader: resize to text_vocab_size, then to vocab_size, copy rows in, set the pad id.

    Our users' loader used transformers' default ``mean_resizing=True``; it only affects rows that are then
    overwritten, so most tests switch it off to stay fast, and one test keeps the default (test_model.py).
    For a tied model the head copy lands last in the shared matrix.
    """
    model.resize_token_embeddings(space.text_vocab_size, mean_resizing=mean_resizing)
    model.resize_token_embeddings(space.vocab_size, mean_resizing=mean_resizing)
    model.config.pad_token_id = space.pad_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[space.text_vocab_size :] = input_rows
        if output_rows is not None:
            model.get_output_embeddings().weight[space.text_vocab_size :] = output_rows
    return model


# The on-disk format, spelled out here rather than imported from uti_peft.constants: the legacy reference reads the
# adapter file as a third party would, so a swap or rename of the package's constants cannot pass unnoticed.
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
INPUT_ROWS_TENSOR = "input_embeddings.new_rows"
OUTPUT_ROWS_TENSOR = "output_embeddings.new_rows"


def saved_rows(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILE))


def legacy_model_for(adapter_dir, space, *, mean_resizing=False, **base_kwargs):
    """A fresh base patched the legacy way with the rows read straight from the adapter file."""
    rows = saved_rows(adapter_dir)
    return legacy_patch(build_tiny_qwen3(**base_kwargs), space, rows[INPUT_ROWS_TENSOR], rows.get(OUTPUT_ROWS_TENSOR),
                        mean_resizing=mean_resizing)


def train_steps(model, space, steps: int = 2, lr: float = 1e-2, seed: int = 0):
    """A few AdamW steps on random tokens from the whole space; returns the optimizer."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, space.vocab_size, (2, 24), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


@pytest.fixture
def make_adapter(tmp_path, token_space):
    """Create (and lightly train) an adapter on a tiny base and save it; returns the directory."""

    def make(*, tied: bool = False, dtype=torch.float32, vocab_rows: int = BASE_ROWS, name: str = "adapter", **cfg):
        base = build_tiny_qwen3(tied=tied, dtype=dtype, vocab_rows=vocab_rows)
        model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space, **cfg))
        train_steps(model, token_space)
        path = tmp_path / name
        model.save_pretrained(path)
        return path

    return make
