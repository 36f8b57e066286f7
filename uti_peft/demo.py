"""``uti-peft demo``: the whole adapter life cycle on a tiny, locally built Qwen3 (no download).

Builds a base whose embedding has more rows than its text vocabulary (as Qwen3's 151,936 vs 151,669),
a token space shaped like the real one, trains the new rows for a few steps, saves the adapter,
reloads it onto a fresh base with ``PeftModel.from_pretrained``, merges, and checks each step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional

import torch
from peft import PeftModel, get_peft_model

from .row_extension.config import RowExtensionConfig
from .tiny import build_tiny_qwen3, tiny_token_space


def run_demo(workdir: Optional[str] = None, *, steps: int = 3, seed: int = 0) -> dict[str, object]:
    """Run the demo and return what it checked (also printed by the CLI)."""
    space = tiny_token_space()
    base_rows = 1024  # > text_vocab_size, like Qwen3's padded embedding
    workdir = workdir or tempfile.mkdtemp(prefix="uti-peft-demo-")
    adapter_dir = os.path.join(workdir, "adapter")

    model = get_peft_model(build_tiny_qwen3(vocab_rows=base_rows, seed=seed), RowExtensionConfig(token_space=space))
    trainable, total = model.get_nb_trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, space.vocab_size, (2, 32), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained_logits = model(batch).logits
    model.save_pretrained(adapter_dir)

    fresh_base = build_tiny_qwen3(vocab_rows=base_rows, seed=seed)
    loaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    with torch.no_grad():
        loaded_logits = loaded(batch).logits
        merged = loaded.merge_and_unload()
        merged_logits = merged(batch).logits

    rows_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "adapter_dir": adapter_dir,
        "base_rows": base_rows,
        "text_vocab_size": space.text_vocab_size,
        "vocab_size": space.vocab_size,
        "new_rows": space.num_new_rows,
        "trainable_params": trainable,
        "all_params": total,
        "final_loss": round(loss.item(), 4),
        "adapter_file_bytes": os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors")),
        "rows_bytes": rows_bytes,
        "loaded_logits_width": loaded_logits.shape[-1],
        "loaded_config_vocab_size": merged.config.vocab_size,
        "loaded_pad_token_id": merged.config.pad_token_id,
        "loaded_equals_trained": torch.equal(loaded_logits, trained_logits),
        "merged_equals_loaded": torch.equal(merged_logits, loaded_logits),
        "merged_embedding_rows": merged.get_input_embeddings().weight.shape[0],
    }


def _run(args: argparse.Namespace) -> int:
    report = run_demo(args.workdir, steps=args.steps)
    print("uti-peft demo: tiny Qwen3 + a token space shaped like the real one (no download)")
    for key, value in report.items():
        print(f"  {key:26s} {value}")
    ok = report["loaded_equals_trained"] and report["merged_equals_loaded"]
    print("OK: save -> PeftModel.from_pretrained -> merge reproduces the logits exactly" if ok else "FAILED")
    return 0 if ok else 1


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the adapter life cycle on a tiny local model")
    parser.add_argument("--workdir", help="where to write the adapter (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=3, help="training steps on random tokens")
    parser.set_defaults(run=_run)
