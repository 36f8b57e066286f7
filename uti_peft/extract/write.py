"""`extract_adapter`: the planned rows written as a row-extension adapter (config, rows, token space, companion
LoRA, and a model card recording where they came from), atomically."""

from __future__ import annotations

import mmap
import os
from typing import Any, Optional, Union

from safetensors.torch import save_file

from ..card import package_version, write_model_card
from ..constants import CONFIG_NAME, INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from ..errors import ExtractError
from ..memory import page_aligned_metadata, sort_metadata_entries
from ..output import PathLike, atomic_output
from ..paths import looks_like_path
from ..row_extension.config import RowExtensionConfig
from ..row_extension.lora import LORA_ADAPTER_NAME, write_lora
from ..token_space import TokenSpace
from .plan import plan_extract
from .sources import ExtractPlan


def extract_adapter(
    base: PathLike,
    source: PathLike,
    out: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    max_text_drift: float = 0.0,
    base_model: Optional[str] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> ExtractPlan:
    """Write the row-extension adapter that ``source`` amounts to on ``base`` into ``out``.

    Args:
        base: The base model SOURCE extends: a local directory or Hub id holding safetensors weights.
        source: A resized checkpoint (directory or Hub id, safetensors), a PEFT LoRA adapter with saved embedding
            layers, or a PEFT trainable-tokens adapter (see the module docstring).
        out: The adapter directory to create (config, rows, ``token_space.json``, model card, and ``lora/`` for a
            LoRA source), written atomically. An existing one is replaced only with ``overwrite`` and only when it
            is empty or an adapter; never the base or the source.
        token_space: The token space; default: ``token_space.json`` beside the source, else inferred from the
            source tokenizer's added tokens (`infer_token_space`).
        max_text_drift: The largest ``|source - base|`` accepted on the text rows (default 0: identical). The
            adapter always uses the base's text rows.
        base_model: The base id recorded in the adapter (default: BASE as given; a local path made absolute).

    Returns the plan that was written (``plan.text_drift``: the largest text-row drift found). Raises
    `ExtractError` (a ``ValueError``) naming the file, the tensor or field and both values; nothing is written then.
    """
    plan = plan_extract(base, source, token_space=token_space, max_text_drift=max_text_drift, progress=progress)
    target = os.path.abspath(os.fspath(out))
    head_rows = "trained" if OUTPUT_ROWS_KEY in plan.rows or plan.tied else "mean"
    config = RowExtensionConfig(
        token_space=plan.space, base_model_name_or_path=base_model or _base_id(plan.base_ref), head_rows=head_rows,
        lora_adapter=LORA_ADAPTER_NAME if plan.lora else None, inference_mode=True,
    )
    with atomic_output(target, overwrite=overwrite, marker=CONFIG_NAME, protected=(plan.base_dir, plan.source_dir),
                       error=ExtractError) as tmp:
        config.save_pretrained(tmp)
        rows = {k: v.contiguous() for k, v in plan.rows.items()}
        anchor = OUTPUT_ROWS_KEY if OUTPUT_ROWS_KEY in rows else INPUT_ROWS_KEY
        # laid out as a save from a model whose head maps this base would be: loading onto it maps the rows
        save_file(rows, os.path.join(tmp, WEIGHTS_NAME), metadata=page_aligned_metadata(
            rows, {"format": "pt"}, anchor, plan.new_rows_file_offset % mmap.PAGESIZE))
        sort_metadata_entries(os.path.join(tmp, WEIGHTS_NAME))
        if plan.lora:
            write_lora(os.path.join(tmp, LORA_ADAPTER_NAME), *plan.lora)
        write_model_card(tmp, config, provenance=_provenance(plan), carry_over=False)
    return plan


def _base_id(base: str) -> str:
    """BASE as the adapter records it: a Hub id as given, a local directory as an absolute path."""
    return os.path.abspath(base) if os.path.isdir(base) or looks_like_path(base) else base


def _provenance(plan: ExtractPlan) -> dict[str, Any]:
    """What the adapter was extracted from, for the model card."""
    facts: dict[str, Any] = {
        "extracted_with": f"uti-peft {package_version('uti-peft')} extract",
        "source": plan.source_ref,
        "source_format": plan.kind,
        "text_vocab_size": plan.space.text_vocab_size,
        "vocab_size": plan.space.vocab_size,
    }
    if plan.text_drift:
        facts["source_text_drift"] = plan.text_drift
    return facts
