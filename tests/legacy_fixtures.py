"""Legacy ``trainable_rows.pt`` checkpoints built the way the legacy trainer saved them, and the legacy
loader's patching, for tests/test_legacy.py (self-contained: no dependency on conftest fixtures)."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any, Optional

import torch

from uti_peft.token_space import TokenSpace

from conftest import legacy_patch as reference_recipe
from conftest import probe_ids  # noqa: F401  (re-exported for the legacy tests)

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
    """The legacy loader applied to a checkpoint's payload: `conftest.legacy_patch`, the one reference recipe."""
    assert (payload["row_start"], payload["row_end"]) == (space.text_vocab_size, space.vocab_size)
    return reference_recipe(model, space, payload["embeddings"], payload["lm_head"])


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
