"""Rows of a PEFT adapter: the new rows of a saved embedding / lm_head (``modules_to_save`` or
``save_embedding_layers``), or ``trainable_tokens_delta`` rows at ``token_indices``; a LoRA's other weights are kept
as the rows' companion LoRA. Text rows saved with them must be the base's (up to a stated drift)."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights

from ..constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, PEFT_KEY_PREFIX
from ..errors import ExtractError
from ..files import SAFETENSORS_CODES
from ..row_extension.lora import check_lora_weights
from ..token_space import TokenSpace
from .base import Base
from .drift import check_text_rows, check_vocab_shape, largest_drift
from .sources import TRAINABLE_TOKENS, ExtractPlan

_DELTA = "trainable_tokens_delta"


def plan_peft(base: Base, source_dir: str, kind: str, space: TokenSpace, max_drift: float) -> ExtractPlan:
    """Rows of a PEFT adapter: full embedding / lm_head matrices, or trainable-token deltas; LoRA kept."""
    config = PeftConfig.from_pretrained(source_dir)
    try:
        weights = load_peft_weights(source_dir, device="cpu")  # safetensors, or .bin with weights_only=True
    except Exception as exc:
        raise ExtractError(f"{source_dir}: cannot read the adapter weights ({exc})") from exc
    where = f"{source_dir} ({os.path.basename(_weights_file(source_dir))})"
    paths = {base.embed.removesuffix(".weight"): INPUT_ROWS_KEY}
    if base.head_name:
        paths[base.head_name.removesuffix(".weight")] = OUTPUT_ROWS_KEY
    lora, matrices, deltas = {}, {}, {}
    for key, tensor in sorted(weights.items(), key=lambda item: ".modules_to_save." in item[0]):
        relative = key.removeprefix(PEFT_KEY_PREFIX)
        if ".original_module." in relative:
            continue  # the module modules_to_save replaced: the resized base's own, which the model does not use
        module = re.sub(r"\.(modules_to_save(\.[^.]+)?|token_adapter)(?=\.)", "", relative).rsplit(".", 1)[0]
        if ".lora_" in relative:
            if relative.partition(".lora_")[0] in paths:
                raise ExtractError(f"{where}: {key} is a LoRA of the vocabulary matrix {relative.partition('.lora_')[0]!r}:"
                                   " it changes the text rows too; not a vocabulary extension")
            lora[key] = tensor
        elif relative.endswith(f".{_DELTA}") and module in paths:
            deltas[paths[module]] = (key, tensor)
        elif relative.endswith(".weight") and module in paths:
            matrices[paths[module]] = (key, tensor)  # a modules_to_save copy (sorted last) wins over a plain save
        else:
            raise ExtractError(f"{where}: {key} {list(tensor.shape)} is neither a LoRA weight nor the embedding / "
                               "lm_head: not a vocabulary extension")
    if base.head is None and INPUT_ROWS_KEY in matrices and OUTPUT_ROWS_KEY not in matrices:
        _check_tied_copy(config, base, where)
    if kind == TRAINABLE_TOKENS or deltas:
        rows, drift, notes = _rows_from_deltas(base, config, deltas, matrices, where, space, max_drift)
    else:
        rows, drift, notes = _rows_from_matrices(base, matrices, where, space, max_drift)
    plan = ExtractPlan("", "", base.dir, source_dir, kind, space, rows, base.head is None, text_drift=drift,
                       notes=notes)
    if lora:
        check_lora_weights(lora, base.model, source_dir)
        plan.lora = (_companion_config(config), lora)
    return plan


def _check_tied_copy(config: Any, base: Base, where: str) -> None:
    """On a tied base, a ``modules_to_save`` copy of the embedding unties it from the head (unless
    ``ensure_weight_tying``): PEFT's head then keeps the rows of the base the user resized, which no file holds."""
    saved = getattr(config, "modules_to_save", None) or ()
    embed = base.embed.removesuffix(".weight")
    if any(embed == m or embed.endswith(f".{m}") for m in saved) and not getattr(config, "ensure_weight_tying", False):
        raise ExtractError(
            f"{where}: modules_to_save copies the embedding of a tied base without ensure_weight_tying, so under PEFT "
            "the lm_head keeps the new rows of the base you resized, which the adapter does not hold; save the "
            "lm_head too (modules_to_save=['embed_tokens', 'lm_head']) or train with ensure_weight_tying=True"
        )


def _weights_file(source_dir: str) -> str:
    """The adapter's weights file (safetensors, else .bin), for messages."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(source_dir, name)):
            return os.path.join(source_dir, name)
    return source_dir


def _rows_from_matrices(base: Base, matrices: dict, where: str, space: TokenSpace,
                        max_drift: float) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """The new rows of saved embedding / lm_head matrices, their text rows checked against the base's."""
    if INPUT_ROWS_KEY not in matrices:
        raise ExtractError(f"{where}: the adapter holds no embedding matrix ({base.embed}; found "
                           f"{sorted(k for k, _ in matrices.values()) or 'only LoRA weights'}): save it with "
                           "modules_to_save=['embed_tokens', 'lm_head'] or save_embedding_layers=True")
    text, drift, rows = space.text_vocab_size, 0.0, {}
    for role, (key, tensor) in matrices.items():
        base_name = base.embed if role == INPUT_ROWS_KEY or base.head is None else base.head
        check_vocab_shape(where, key, list(tensor.shape), base, base_name, space)
        dtype = SAFETENSORS_CODES.get(tensor.dtype, str(tensor.dtype))
        drift = max(drift, check_text_rows(where, key, lambda s, e, t=tensor: t[s:e], base, base_name, text,
                                           max_drift, dtype))
        rows[role] = tensor[text:].clone()
    if base.head is None and OUTPUT_ROWS_KEY in rows:
        head = rows.pop(OUTPUT_ROWS_KEY)
        if not torch.equal(head, rows[INPUT_ROWS_KEY]):
            raise ExtractError(f"{where}: the base ties its lm_head to its embedding but the adapter's lm_head rows "
                               f"{text}.. differ from its embedding rows: they cannot share one matrix")
    notes = []
    if base.head is not None and OUTPUT_ROWS_KEY not in rows:
        notes.append(_MEAN_HEAD_NOTE)
    return rows, drift, notes


_MEAN_HEAD_NOTE = ("the source holds no lm_head rows (PEFT took them from the base you resized): the adapter's head "
                   "rows are the mean of the base's text rows (head_rows='mean')")


def _rows_from_deltas(base: Base, config: Any, deltas: dict, matrices: dict, where: str, space: TokenSpace,
                      max_drift: float) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """The rows of trainable-token deltas at the config's ``token_indices`` (which must cover every new id; any
    text id among them must hold the base's row)."""
    if matrices:
        raise ExtractError(f"{where}: holds both trainable-token deltas and whole matrices "
                           f"{sorted(k for k, _ in matrices.values())}; expected one or the other")
    if INPUT_ROWS_KEY not in deltas:
        raise ExtractError(f"{where}: no trainable_tokens_delta for the embedding ({base.embed})")
    text, total = space.text_vocab_size, space.vocab_size
    rows, drift = {}, 0.0
    for role, (key, delta) in deltas.items():
        base_name = base.embed if role == INPUT_ROWS_KEY or base.head is None else base.head
        indices = _token_indices(config, key)
        if len(indices) != delta.shape[0] or delta.dim() != 2:
            raise ExtractError(f"{where}: {key} has shape {list(delta.shape)} but token_indices has "
                               f"{len(indices)} ids")
        hidden = base.stored[base_name].entry["shape"][1]
        if delta.shape[1] != hidden:
            raise ExtractError(f"{where}: {key} has hidden size {delta.shape[1]} but the base's {base_name} has "
                               f"{hidden}: not an extension of this base")
        position = {token_id: i for i, token_id in enumerate(indices)}
        uncovered = [i for i in range(text, total) if i not in position]
        beyond = sorted(i for i in position if i >= total)
        if uncovered or beyond:
            raise ExtractError(
                f"{where}: token_indices must cover the new ids {text}..{total - 1} ({space.source}) and no more; "
                + (f"missing {uncovered[:5]}{' …' if len(uncovered) > 5 else ''} (those rows came from your resize "
                   "code, not the adapter)" if uncovered else f"ids beyond the vocabulary {beyond[:5]}")
            )
        text_ids = sorted(i for i in position if i < text)
        if text_ids:
            source_text = delta[[position[i] for i in text_ids]]
            base_text = torch.stack([base.rows(base_name)(i, i + 1)[0] for i in text_ids])
            if source_text.dtype != base_text.dtype:
                raise ExtractError(f"{where}: {key} is {source_text.dtype} but the base's {base_name} is "
                                   f"{base_text.dtype}")
            d, row = largest_drift(source_text, base_text)
            if d > max_drift:
                raise ExtractError(
                    f"{where}: {key} changes text token id {text_ids[row]} (largest difference {d:.6g}, tolerance "
                    f"--max-text-drift {max_drift:g}): not a vocabulary extension of this base")
            drift = max(drift, d)
        rows[role] = delta[[position[i] for i in range(text, total)]].clone()
    if base.head is None and OUTPUT_ROWS_KEY in rows:
        if not torch.equal(rows.pop(OUTPUT_ROWS_KEY), rows[INPUT_ROWS_KEY]):
            raise ExtractError(f"{where}: the base ties its lm_head to its embedding but the adapter's lm_head delta "
                               "differs from its embedding delta")
    notes = [_MEAN_HEAD_NOTE] if base.head is not None and OUTPUT_ROWS_KEY not in rows else []
    return rows, drift, notes


def _token_indices(config: Any, key: str) -> list[int]:
    """The ids a delta tensor holds: ``token_indices`` (TrainableTokensConfig) or ``trainable_token_indices``
    (LoraConfig: a list for the embedding, or a dict by module name)."""
    indices = getattr(config, "token_indices", None) or getattr(config, "trainable_token_indices", None)
    if isinstance(indices, dict):
        module = key.removeprefix(PEFT_KEY_PREFIX).split(".token_adapter")[0].removesuffix(f".{_DELTA}")
        found = [v for name, v in indices.items() if module == name or module.endswith(f".{name}")]
        indices = found[0] if found else None
    if not indices:
        raise ExtractError(f"{key}: the adapter config names no token indices for it")
    return [int(i) for i in indices]


def _companion_config(config: Any) -> LoraConfig:
    """The source's LoRA config as the rows' companion: the vocabulary modules are the rows' now."""
    lora = copy.deepcopy(config)
    lora.modules_to_save = None
    lora.trainable_token_indices = None
    lora.inference_mode = True
    return lora
