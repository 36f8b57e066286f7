"""Legacy ``trainable_rows.pt`` checkpoints built the way the legacy trainer saved them, and the legacy
loader's patching, for tests/test_legacy.py (self-contained: no dependency on conftest fixtures)."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any, Optional

import torch

from uti_peft.token_space import TokenSpace

TINY_BASE_LLM = "uti-peft/tiny-qwen3"  # tiny_token_space().base_text_model
DROP = object()  # an override value that removes the field


def make_rows(space: TokenSpace, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(space.num_new_rows, hidden, generator=generator) * 0.05).to(dtype)


def write_legacy_checkpoint(
    directory,
    space: TokenSpace,
    *,
    hidden: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    lm_head: bool = True,
    seed: int = 0,
    base_llm: str = TINY_BASE_LLM,
    with_token_space: bool = True,
    with_json: bool = True,
    pt_overrides: Optional[dict[str, Any]] = None,
    json_overrides: Optional[dict[str, Any]] = None,
    zipfile: bool = True,
) -> dict[str, Any]:
    """Write ``trainable_rows.pt`` / ``trainable_rows.json`` / ``token_space.json``; return the pt payload."""
    os.makedirs(directory, exist_ok=True)
    payload: dict[str, Any] = {
        "row_start": space.text_vocab_size,
        "row_end": space.vocab_size,
        "base_llm": base_llm,
        "embeddings": make_rows(space, hidden, dtype, seed),
        "lm_head": make_rows(space, hidden, dtype, seed + 1) if lm_head else None,
        "dtype": str(dtype),
    }
    payload.update(pt_overrides or {})
    payload = {key: value for key, value in payload.items() if value is not DROP}
    torch.save(payload, os.path.join(directory, "trainable_rows.pt"), _use_new_zipfile_serialization=zipfile)
    if with_json:
        meta = {
            "row_start": payload["row_start"],
            "row_end": payload["row_end"],
            "base_llm": payload["base_llm"],
            "has_lm_head": payload.get("lm_head") is not None,
        }
        meta.update(json_overrides or {})
        meta = {key: value for key, value in meta.items() if value is not DROP}
        with open(os.path.join(directory, "trainable_rows.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    if with_token_space:
        space.save(os.path.join(directory, "token_space.json"))
    return payload


def legacy_patch(model, payload: dict[str, Any], space: TokenSpace):
    """The legacy loader: resize to row_start, then to row_end, set the pad id, copy the rows in (for a tied
    model the lm_head copy lands last in the shared matrix)."""
    row_start, row_end = payload["row_start"], payload["row_end"]
    model.resize_token_embeddings(row_start, mean_resizing=False)
    model.resize_token_embeddings(row_end, mean_resizing=False)
    model.config.pad_token_id = space.pad_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[row_start:row_end] = payload["embeddings"]
        if payload["lm_head"] is not None:
            model.get_output_embeddings().weight[row_start:row_end] = payload["lm_head"]
    return model


def probe_ids(space: TokenSpace, length: int = 40, seed: int = 0) -> torch.Tensor:
    """2 sequences holding the first and last id of every range plus random ids from the whole space."""
    edges = [i for r in space.ranges.values() for i in (r.start, r.end)]
    generator = torch.Generator().manual_seed(seed)
    rest = torch.randint(0, space.vocab_size, (2 * length - len(edges),), generator=generator).tolist()
    return torch.tensor(edges + rest).view(2, length)


class RunsCodeOnLoad:
    """Pickles to a call of ``exec`` (or ``os.system``, pickled as ``posix.system``) that writes ``marker``:
    what a malicious checkpoint does."""

    def __init__(self, marker: str, via: str = "exec") -> None:
        self.marker = marker
        self.via = via

    def __reduce__(self):
        if self.via == "system":
            return (os.system, (f"printf 'code ran' > {shlex.quote(self.marker)}",))
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().view(torch.uint8).numpy().tobytes() == b.contiguous().view(torch.uint8).numpy().tobytes()
    )
