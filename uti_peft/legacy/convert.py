"""`convert_legacy`: a legacy checkpoint (and its Stage-4 LoRA) -> a row-extension PEFT adapter directory."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from safetensors.torch import save_file

from ..card import write_model_card
from ..constants import INPUT_ROWS_KEY, LEGACY_PT_NAME, OUTPUT_ROWS_KEY, TOKEN_SPACE_NAME, WEIGHTS_NAME
from ..errors import LegacyCheckpointError
from ..output import PathLike
from ..row_extension.config import RowExtensionConfig
from ..row_extension.lora import LORA_ADAPTER_NAME, read_legacy_lora, write_lora
from ..token_space import TokenSpace, resolve_token_space
from .checkpoint import (
    _atomic_output,
    _bar,
    _check_finite,
    _check_target,
    _check_token_space,
    _dtype_name,
    _read_eval_report,
    _resolve_checkpoint,
    read_legacy,
)
from .verify import _Sha256Jobs, _hash_as_safetensors, _parse_dtype, _verify_safetensors


# ---------------------------------------------------------------------------------------- convert
def convert_legacy(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    base_model: Optional[str] = None,
    dtype: Union[None, str, torch.dtype] = None,
    eval_report: Union[None, PathLike, dict] = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: Optional[bool] = None,
    lora_dir: Optional[PathLike] = None,
) -> str:
    """Convert a legacy ``trainable_rows.pt`` checkpoint into a row-extension PEFT adapter directory.

    Args:
        checkpoint_dir: The checkpoint directory (or the path of its ``trainable_rows.pt``).
        output_dir: The adapter directory to create: ``adapter_config.json``, ``adapter_model.safetensors``
            (the rows only), ``token_space.json`` and a ``README.md`` model card.
        token_space: The token space, when it is not (only) in the checkpoint directory; if both exist they
            must be identical.
        base_model: The adapter's base model id; default: ``base_llm`` from the checkpoint.
        dtype: ``None``/``"keep"`` (default) keeps the rows' dtype; else ``"bfloat16"``, ``"float16"``,
            ``"float32"`` (or a ``torch.dtype``).
        eval_report: The users' eval JSON (path or dict, ``{"loss_mean": ..., "counts": ...}``) for the card.
        overwrite: Replace an existing output directory (one that is empty or holds an adapter).
        allow_nonfinite: Convert rows holding NaN/Inf instead of refusing them.
        progress: Progress bars: ``None`` on a terminal only, ``True``/``False`` always/never.
        lora_dir: A Stage-4 PEFT LoRA directory trained on the legacy (resized) model: it is stored as the
            adapter's LoRA (``lora/``) and loads with the rows (see `uti_peft.row_extension.lora`).

    Returns:
        The absolute path of the adapter directory. Raises `LegacyCheckpointError` (a ``ValueError``), or
        `TokenSpaceError`, naming the file, the field and the values; nothing is written then.
    """
    checkpoint, pt_path = _resolve_checkpoint(checkpoint_dir)
    target = os.path.abspath(os.fspath(output_dir))
    out_dtype = _parse_dtype(dtype)
    _check_target(target, overwrite, ADAPTER_CONFIG_NAME, (checkpoint,))
    space = resolve_token_space(token_space, checkpoint, must_agree=True)
    if space is None:
        raise LegacyCheckpointError(
            f"{checkpoint}: no {TOKEN_SPACE_NAME} in the checkpoint directory; pass its path with --token-space "
            "(token_space=...), e.g. outputs/stage3_token_lm/token_space.json"
        )
    report, report_path = _read_eval_report(eval_report)
    with _Sha256Jobs() as hashing:
        # the source's sha256 (a provenance fact) is computed on a worker thread while the rows are loaded,
        # checked and written
        source_sha256 = hashing.file(pt_path, progress)
        ckpt = read_legacy(pt_path)
        _check_token_space(ckpt, space)
        out_dtype = out_dtype or ckpt.dtype
        rows = _checked_rows(ckpt, out_dtype, pt_path, allow_nonfinite)
        lora = read_legacy_lora(os.fspath(lora_dir), rows, space.text_vocab_size) if lora_dir is not None else None
        config = RowExtensionConfig(
            token_space=space,
            base_model_name_or_path=base_model or ckpt.base_llm,
            head_rows="trained" if ckpt.lm_head is not None else "mean",
            lora_adapter=LORA_ADAPTER_NAME if lora else None,
        )
        provenance = _provenance(checkpoint_dir, source_sha256, ckpt, out_dtype, config, report_path, lora_dir)
        with _atomic_output(target, overwrite=overwrite, marker=ADAPTER_CONFIG_NAME, protected=(checkpoint,)) as tmp:
            _write_adapter(tmp, config, rows, lora, provenance, report, hashing, progress)
    return target


def _provenance(checkpoint_dir, source_sha256, ckpt, out_dtype, config, report_path, lora_dir) -> dict:
    """Where the rows came from, for the card (``source_sha256`` is a future, resolved when the card is written)."""
    provenance = {
        "source_checkpoint": os.path.normpath(os.fspath(checkpoint_dir)),
        "source_sha256": source_sha256,
        "source_format": LEGACY_PT_NAME,
        "row_start": ckpt.row_start,
        "row_end": ckpt.row_end,
        "dtype": _dtype_name(out_dtype),
    }
    if out_dtype != ckpt.dtype:
        provenance["source_dtype"] = _dtype_name(ckpt.dtype)
    if config.base_model_name_or_path != ckpt.base_llm:
        provenance["source_base_llm"] = ckpt.base_llm
    if report_path:
        provenance["eval_report"] = report_path
    if lora_dir is not None:
        provenance["source_lora"] = os.path.normpath(os.fspath(lora_dir))
    return provenance


def _checked_rows(ckpt, out_dtype: torch.dtype, pt_path: str, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's rows under the adapter's names, in ``out_dtype``, refused if non-finite (before and after a
    cast) unless ``allow_nonfinite``."""
    rows = {INPUT_ROWS_KEY: ckpt.embeddings}
    if ckpt.lm_head is not None:
        rows[OUTPUT_ROWS_KEY] = ckpt.lm_head
    names = {INPUT_ROWS_KEY: "embeddings", OUTPUT_ROWS_KEY: "lm_head"}
    for key, tensor in rows.items():
        _check_finite(names[key], tensor, ckpt.row_start, pt_path, allow_nonfinite)
    rows = _storable(rows, out_dtype)
    if out_dtype != ckpt.dtype:
        for key, tensor in rows.items():
            _check_finite(f"{names[key]} cast to {_dtype_name(out_dtype)}", tensor, ckpt.row_start, pt_path,
                          allow_nonfinite)
    return rows


def _write_adapter(tmp: str, config: RowExtensionConfig, rows: dict[str, torch.Tensor], lora, provenance: dict,
                   report: Optional[dict], hashing: _Sha256Jobs, progress: Optional[bool]) -> None:
    """Config, rows (hashed while written, then read back and compared), LoRA and the model card into ``tmp``."""
    config.save_pretrained(tmp)
    weights_path = os.path.join(tmp, WEIGHTS_NAME)
    metadata = {"format": "pt"}
    rows_bytes = sum(t.numel() * t.element_size() for t in rows.values())
    with _bar(rows_bytes, f"writing {WEIGHTS_NAME}", progress) as bar:
        predicted = _hash_as_safetensors(rows, metadata, hashing)  # hashed while being written
        save_file(rows, weights_path, metadata=metadata)
        weights_sha256 = _verify_safetensors(weights_path, rows, bar, hashing, predicted)  # a future
    if lora:
        write_lora(os.path.join(tmp, LORA_ADAPTER_NAME), *lora)
    provenance = {**provenance, "source_sha256": provenance["source_sha256"].result()}
    # the card (README.md) records the rows' size and sha256, the provenance and the eval numbers
    write_model_card(
        tmp, config, provenance=provenance, eval_report=report, carry_over=False,
        weights_sha256=weights_sha256.result,  # awaited after rendering
    )


def _storable(rows: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rows in ``dtype``, contiguous, each in a storage of its own: safetensors refuses overlapping views of
    one storage (a tied trainer's lm_head may be the embeddings tensor itself, or a view of the same matrix).
    A tensor is copied only when it is not so already (a view of a larger storage is fine: only its own bytes
    are written)."""
    storable: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in rows.items():
        tensor = tensor.to(dtype)
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        storable[key] = tensor
    return storable
