"""The three kinds of source extract reads (a resized checkpoint, a PEFT LoRA adapter with saved embedding
layers, a PEFT trainable-tokens adapter), telling them apart from their files, and the plan made from one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import LoraConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..constants import CONFIG_NAME
from ..errors import ExtractError
from ..token_space import TokenSpace

CHECKPOINT, LORA, TRAINABLE_TOKENS = "resized checkpoint", "PEFT LoRA adapter", "PEFT trainable-tokens adapter"
EXTRACTABLE = ("LORA", "TRAINABLE_TOKENS")  # the peft_type of the PEFT adapters extract reads
CHECKPOINT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)


@dataclass
class ExtractPlan:
    """Everything `extract_adapter` writes, decided and checked before the first byte is."""

    base_ref: str
    source_ref: str
    base_dir: str
    source_dir: str
    kind: str  # CHECKPOINT, LORA or TRAINABLE_TOKENS
    space: TokenSpace
    rows: dict[str, torch.Tensor]  # INPUT_ROWS_KEY (and OUTPUT_ROWS_KEY when the base is untied and they are known)
    tied: bool
    lora: Optional[tuple[LoraConfig, dict[str, torch.Tensor]]] = None
    text_drift: float = 0.0  # the largest |source - base| over the text rows (0: identical)
    # where the base's extended matrix (untied: the lm_head, tied: the embedding) would hold the new rows: the file
    # offset of its row text_vocab_size, which the rows file is laid out to match (memory.page_aligned_metadata)
    new_rows_file_offset: Optional[int] = None
    notes: list[str] = field(default_factory=list)  # what the user should know (printed by the CLI)


def source_kind(source_dir: str) -> str:
    """What ``source_dir`` holds: `CHECKPOINT`, `LORA` or `TRAINABLE_TOKENS`; anything else is refused."""
    config_file = os.path.join(source_dir, CONFIG_NAME)
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
        if peft_type == "LORA":
            return LORA
        if peft_type == "TRAINABLE_TOKENS":
            return TRAINABLE_TOKENS
        if peft_type == "ROW_EXTENSION":
            raise ExtractError(f"{config_file}: peft_type is 'ROW_EXTENSION': this is already a row-extension "
                               "adapter; nothing to extract")
        raise ExtractError(f"{config_file}: peft_type is {peft_type!r}; extract reads LoRA adapters with saved "
                           "embedding layers (modules_to_save / save_embedding_layers) and trainable-tokens adapters")
    if any(os.path.isfile(os.path.join(source_dir, n)) for n in CHECKPOINT_FILES):
        return CHECKPOINT
    bins = sorted(n for n in os.listdir(source_dir) if n.endswith((".bin", ".pt", ".pth")))
    raise ExtractError(
        f"source {source_dir!r} holds neither {CONFIG_NAME} (a PEFT adapter) nor {SAFE_WEIGHTS_NAME} / "
        f"{SAFE_WEIGHTS_INDEX_NAME} (a checkpoint)"
        + (f"; found {bins[:3]}: re-save it with save_pretrained(..., safe_serialization=True)" if bins else "")
    )
