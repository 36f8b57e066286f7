"""Rows of a resized checkpoint (safetensors, one file or shards): its embedding (and untied lm_head) rows beyond
the text vocabulary; its config must be the base's (vocabulary fields aside), its text rows the base's (up to a
stated drift) and every other tensor the base's byte for byte."""

from __future__ import annotations

import os
from typing import Any, Optional

from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from ..constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY
from ..errors import ExtractError
from ..merge import StoredTensor, read_checkpoint
from ..token_space import TokenSpace
from .base import BLOCK, Base, stored_rows
from .drift import check_text_rows, check_vocab_shape, largest_drift
from .sources import CHECKPOINT, ExtractPlan

# config fields a resized or fine-tuned checkpoint may change without changing what the weights compute
_FREE_CONFIG_FIELDS = {
    "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype", "transformers_version",
    "_name_or_path", "use_cache", "architectures",
}


def plan_checkpoint(base: Base, source_dir: str, space: TokenSpace, max_drift: float,
                    progress: Optional[bool]) -> ExtractPlan:
    """Rows of a resized checkpoint: its config, tensor names and every non-vocabulary tensor must be the base's."""
    config = AutoConfig.from_pretrained(source_dir)
    _check_config(base, config, source_dir)
    stored = read_checkpoint(source_dir)
    vocab_names = {base.embed, base.head_name} - {None}
    if base.head is None and base.head_name:
        stored.pop(base.head_name, None)  # a tied head stored anyway: the embedding is the matrix
    others = sorted(set(base.stored) - vocab_names)
    missing = sorted(set(base.stored) - set(stored))
    extra = sorted(set(stored) - set(base.stored))
    if missing or extra:
        raise ExtractError(f"source {source_dir!r} is not the base's architecture: tensors missing {missing[:5]}"
                           f"{' …' if len(missing) > 5 else ''}, tensors the base lacks {extra[:5]}"
                           f"{' …' if len(extra) > 5 else ''}")
    text, total = space.text_vocab_size, space.vocab_size
    rows, drift = {}, 0.0
    for key, name in ((INPUT_ROWS_KEY, base.embed), (OUTPUT_ROWS_KEY, base.head)):
        if name is None:
            continue
        item = stored[name]
        where = f"{os.path.relpath(item.shard, source_dir)} in {source_dir}"
        check_vocab_shape(where, name, item.entry["shape"], base, name, space)
        drift = max(drift, check_text_rows(where, name, stored_rows(item, name), base, name, text, max_drift,
                                           item.entry["dtype"]))
        rows[key] = stored_rows(item, name)(text, total).clone()
    changed = _changed_tensors(base, stored, others, progress)
    if changed:
        raise ExtractError(
            f"source {source_dir!r} is not a vocabulary extension of base {base.dir!r}: {len(changed)} tensor(s) "
            f"besides the embedding and lm_head changed: {'; '.join(changed[:5])}{' …' if len(changed) > 5 else ''}"
        )
    return ExtractPlan("", "", base.dir, source_dir, CHECKPOINT, space, rows, base.head is None, text_drift=drift)


def _check_config(base: Base, config: Any, source_dir: str) -> None:
    """The source's config must describe the base's architecture (vocabulary size, ids and dtype aside)."""
    where = os.path.join(source_dir, "config.json")
    if config.model_type != base.config.model_type:
        raise ExtractError(f"{where}: model_type is {config.model_type!r} but the base's is "
                           f"{base.config.model_type!r}: not an extension of this base")
    ours, theirs = (getattr(c.get_text_config(), "hidden_size", None) for c in (base.config, config))
    if ours != theirs:
        raise ExtractError(f"{where}: hidden_size is {theirs} but the base's is {ours}: not an extension of this base")
    a, b = _comparable(base.config.to_dict()), _comparable(config.to_dict())
    differ = [f"{k}: {a.get(k, '<unset>')!r} in the base, {b.get(k, '<unset>')!r} in the source"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        raise ExtractError(f"{where} differs from the base's config: {'; '.join(differ[:5])}")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config's fields, nested text configs flattened, without those a resize may change."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config"):
            flat.update({f"{key}.{k}": v for k, v in _comparable(value).items()})
        elif key not in _FREE_CONFIG_FIELDS:
            flat[key] = value
    return flat


def _changed_tensors(base: Base, stored: dict[str, StoredTensor], names: list[str],
                     progress: Optional[bool]) -> list[str]:
    """The tensors among ``names`` whose bytes differ between the source and the base, described."""
    total = sum(stored[n].nbytes for n in names)
    disable = not hf_logging.is_progress_bar_enabled() if progress is None else not progress
    changed = []
    with hf_logging.tqdm(total=total, desc="Comparing with the base", unit="B", unit_scale=True,
                         disable=disable) as bar:
        for name in names:
            if not _same_bytes(stored[name], base.stored[name]):
                changed.append(_describe_change(name, stored[name], base.stored[name]))
            bar.update(stored[name].nbytes)
    return changed


def _same_bytes(a: StoredTensor, b: StoredTensor) -> bool:
    """Whether two stored tensors have the same bytes, compared 16 MiB at a time."""
    if a.nbytes != b.nbytes:
        return False
    with open(a.shard, "rb", buffering=0) as fa, open(b.shard, "rb", buffering=0) as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.nbytes
        while left:
            n = min(BLOCK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def _describe_change(name: str, a: StoredTensor, b: StoredTensor) -> str:
    """How tensor ``name`` differs: its dtype or shape, else the largest difference of its values."""
    if (a.entry["dtype"], a.entry["shape"]) != (b.entry["dtype"], b.entry["shape"]):
        return (f"{name} ({b.entry['dtype']} {b.entry['shape']} in the base, {a.entry['dtype']} {a.entry['shape']} "
                "in the source)")
    with safe_open(a.shard, framework="pt") as sa, safe_open(b.shard, framework="pt") as sb:
        drift, _ = largest_drift(sa.get_tensor(name).reshape(1, -1), sb.get_tensor(name).reshape(1, -1))
    return f"{name} (max |difference| {drift:.6g})"
