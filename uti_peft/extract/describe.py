"""What ``uti-peft inspect`` says about a source `uti_peft.extract` reads, from headers and configs only."""

from __future__ import annotations

import os
from typing import Any

from peft import PeftConfig
from transformers import AutoConfig

from ..files import SAFETENSORS_DTYPES, read_safetensors_header
from ..merge import meta_model, module_names, read_checkpoint
from ..output import PathLike
from ..token_space import resolve_token_space
from .sources import CHECKPOINT, source_kind


def describe_source(path: PathLike) -> dict[str, Any]:
    """What ``uti-peft inspect`` says about a directory `extract_adapter` reads, from headers and configs only."""
    path = os.fspath(path)
    kind = source_kind(path)
    space = resolve_token_space(None, path)
    facts: dict[str, Any] = {"format": kind, "path": path}
    if kind == CHECKPOINT:
        config = AutoConfig.from_pretrained(path)
        stored = read_checkpoint(path)
        embed, _, tied = module_names(meta_model(config))
        shape, dtype = stored[embed].entry["shape"], stored[embed].entry["dtype"]
        facts.update({"model_type": config.model_type, "vocab_rows": shape[0], "hidden_size": shape[1],
                      "dtype": str(SAFETENSORS_DTYPES.get(dtype, dtype)).removeprefix("torch."), "tied": tied,
                      "tensors": len(stored)})
    else:
        config = PeftConfig.from_pretrained(path)
        header = _adapter_header(path)
        vocab = {k: f"{v['shape']} {v['dtype']}" for k, v in header.items() if ".lora_" not in k}
        facts.update({
            "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
            "base_model": config.base_model_name_or_path,
            "vocabulary_tensors": vocab or "none (nothing to extract: no saved embedding layers)",
            "lora_tensors": sum(".lora_" in k for k in header),
        })
        indices = getattr(config, "token_indices", None) or getattr(config, "trainable_token_indices", None)
        if indices:
            ids = sorted({i for v in (indices.values() if isinstance(indices, dict) else [indices]) for i in v})
            facts["token_indices"] = f"{len(ids)} ids, {ids[0]}..{ids[-1]}"
    facts["token_space"] = space.source if space else "none beside it (inferred from its tokenizer, or --token-space)"
    if space:
        facts["row_range"] = f"[{space.text_vocab_size}, {space.vocab_size})"
    facts["next"] = f"uti-peft extract BASE {path} -o ADAPTER"
    facts["problems"] = []
    return facts


def _adapter_header(path: str) -> dict[str, Any]:
    """The tensor entries of a PEFT adapter's safetensors header ({} when it saved .bin)."""
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return {}
    return {k: v for k, v in read_safetensors_header(weights).items() if k != "__metadata__"}
