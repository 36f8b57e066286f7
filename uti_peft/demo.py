"""``uti-peft demo``: the whole adapter life cycle on a tiny, locally built Qwen3 (no download).

Builds a base whose embedding has more rows than its text vocabulary (as Qwen3's 151,936 vs 151,669), its
byte-level BPE tokenizer and a token space shaped like the real one, trains the new rows for a few steps, saves
the adapter with the tokenizer extended by every modality token (as an adapter is published), reloads it onto a
fresh base with ``PeftModel.from_pretrained``, generates from a text prompt, merges, and checks each step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Optional

import torch
from peft import PeftModel, get_peft_model

from .constants import TOKEN_SPACE_NAME
from .output import atomic_output
from .output_dir import demo_workdir_targets
from .row_extension.config import RowExtensionConfig
from .tiny import build_tiny_qwen3, build_tiny_tokenizer, tiny_token_space
from .tokenizer import add_modality_tokens

BASE_ROWS = 1024  # > text_vocab_size, like Qwen3's padded embedding
PROMPT = "Describe this picture in one sentence."
_NO_MARKER = ".uti-peft-demo-never-written"  # atomic_output replaces only an empty directory: demo has no marker


def run_demo(workdir: Optional[str] = None, *, steps: int = 3, seed: int = 0) -> dict[str, object]:
    """Run the demo and return what it checked (also printed by the CLI).

    With ``workdir``, the tiny base (with its tokenizer and ``token_space.json``) is saved in ``workdir/base`` and the
    adapter (with the extended tokenizer) in ``workdir/adapter``, recording that base, and both are kept: the other commands (``train --base``, ``eval``,
    ``merge``) and ``AutoModelForCausalLM.from_pretrained(workdir/adapter)`` can use them offline. Without it
    everything goes to a temporary directory that is removed before returning (``adapter_dir`` is then None).
    ``steps`` may be 0: the rows keep their initial values and everything else is checked the same way.
    ``workdir/base`` and ``workdir/adapter`` must be new or empty (`FileExistsError` otherwise, before anything is
    built); each is written under a temporary name and renamed when complete.
    """
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, got {steps}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="uti-peft-demo-"))
            report = _life_cycle(os.path.join(root, "adapter"), steps, seed, None)
        else:
            base_dir, adapter_dir = demo_workdir_targets(workdir)
            report = _life_cycle(adapter_dir, steps, seed, base_dir)
        if workdir is None:
            report["adapter_dir"] = None
    return report


def _life_cycle(adapter_dir: str, steps: int, seed: int, base_dir: Optional[str]) -> dict[str, object]:
    space = tiny_token_space()
    base = build_tiny_qwen3(vocab_rows=BASE_ROWS, seed=seed)
    tokenizer = build_tiny_tokenizer(space.text_vocab_size)
    if base_dir is not None:
        with atomic_output(base_dir, overwrite=True, marker=_NO_MARKER) as tmp:
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            space.save(os.path.join(tmp, TOKEN_SPACE_NAME))
    model = get_peft_model(base, RowExtensionConfig(token_space=space))
    model.peft_config["default"].base_model_name_or_path = base_dir
    trainable, total = model.get_nb_trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, space.vocab_size, (2, 32), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch, labels=batch)
    add_modality_tokens(tokenizer, space)
    with atomic_output(adapter_dir, overwrite=True, marker=_NO_MARKER) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    loaded = PeftModel.from_pretrained(build_tiny_qwen3(vocab_rows=BASE_ROWS, seed=seed), adapter_dir)
    with torch.no_grad():
        loaded_logits = loaded(batch).logits
        prompt = tokenizer(PROMPT, return_tensors="pt")
        generated = loaded.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[1]:]
        merged = loaded.merge_and_unload()
        merged_logits = merged(batch).logits

    rows_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "adapter_dir": adapter_dir,
        "base_rows": BASE_ROWS,
        "text_vocab_size": space.text_vocab_size,
        "vocab_size": space.vocab_size,
        "new_rows": space.num_new_rows,
        "tokenizer_size": len(tokenizer),
        "training_steps": steps,
        "trainable_params": trainable,
        "all_params": total,
        "loss_after_training": round(trained.loss.item(), 4),
        "adapter_file_bytes": os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors")),
        "rows_bytes": rows_bytes,
        "loaded_logits_width": loaded_logits.shape[-1],
        "loaded_config_vocab_size": merged.config.vocab_size,
        "loaded_pad_token_id": merged.config.pad_token_id,
        "pad_token": tokenizer.pad_token,
        "generated_from_text": f"{PROMPT!r} -> {tokenizer.decode(generated)!r} (random weights)",
        "loaded_equals_trained": torch.equal(loaded_logits, trained.logits),
        "merged_equals_loaded": torch.equal(merged_logits, loaded_logits),
        "merged_embedding_rows": merged.get_input_embeddings().weight.shape[0],
    }
