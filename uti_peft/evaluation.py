"""Loss evaluation on tokenized multimodal data: the function behind ``uti-peft eval``.

The data is our users' tokenized JSONL (one object per line with ``task``, ``input_ids`` and optionally
``labels``; other fields are metadata and ignored). The report keeps the schema their evaluation
already produces (``loss_mean`` and ``counts`` keyed by ``all`` and each task) and adds token-weighted
means. Losses are computed per token with ``reduction="none"`` and summed per example, so padding a
batch never changes an example's numbers: batch size only changes speed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .files import DTYPES
from .data import (
    ALL,
    DEFAULT_MAX_SEQ_LEN,
    IGNORE_INDEX,
    TRUNCATION_SIDES,
    PaddingCollator,
    check_window,
    prepare,
    read_jsonl,
    scored_token_losses,
)
from .data import Example as EvalExample
from .token_space import TokenSpace


# Re-exported: the JSONL reader and its constants moved to uti_peft.data, where training shares them.
__all__ = ["ALL", "DEFAULT_MAX_SEQ_LEN", "IGNORE_INDEX", "TRUNCATION_SIDES", "EvalExample", "evaluate",
           "load_model", "read_jsonl", "summary"]


# ---------------------------------------------------------------------------------------- scoring
def evaluate(
    model: torch.nn.Module,
    token_space: TokenSpace,
    examples: Iterable[EvalExample],
    *,
    batch_size: int = 1,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    truncation_side: str = "left",
    progress: bool = True,
) -> dict[str, Any]:
    """Mean loss per task and over all examples of any causal LM (plain, legacy-patched or PeftModel).

    Each example is truncated to ``max_seq_len`` (``left`` keeps the end, as our users' eval does),
    scored against its ``labels`` if given (``-100`` ignored) or else its ``input_ids`` with pad tokens
    ignored, shifted by one as transformers does. Examples left with no scored token are not scored
    and are counted under ``skipped``. Returns ``loss_mean`` (mean of per-example mean losses),
    ``loss_token_weighted`` (token-loss sum / token count), ``counts`` (examples), ``tokens`` (scored
    tokens), each keyed by ``all`` and every task, plus ``skipped`` and ``truncated`` (examples longer than
    ``max_seq_len``, scored on their window only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_window(max_seq_len, truncation_side)
    examples = list(examples)
    truncated = sum(len(e.input_ids) > max_seq_len for e in examples)
    prepared = [prepare(e, token_space, max_seq_len, truncation_side) for e in examples]
    scorable = [e for e in prepared if e.has_scored_tokens]
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once.
    scorable.sort(key=lambda e: len(e.input_ids), reverse=True)

    model.eval()
    device = next(model.parameters()).device
    collate = PaddingCollator(token_space.pad_token_id)
    results: list[tuple[str, float, int]] = []
    with torch.inference_mode(), tqdm(total=len(scorable), desc="eval", unit="example", disable=not progress) as bar:
        for start in range(0, len(scorable), batch_size):
            batch = scorable[start : start + batch_size]
            sums, counts = _score_batch(model, collate(batch), device)
            results.extend((e.task, s, n) for e, s, n in zip(batch, sums.tolist(), counts.tolist()))
            bar.update(len(batch))
    if not results:
        raise ValueError("no example has a token to score (every example is empty or fully ignored)")
    return _report(results, skipped=len(prepared) - len(scorable), truncated=truncated)


def _score_batch(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of a padded batch (see `PaddingCollator`): (sum of token losses, number of scored tokens)."""
    logits = model(
        input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device), use_cache=False
    ).logits
    token_losses, rows = scored_token_losses(logits, inputs["labels"].to(device))
    # Summed in float64 on the CPU (not every accelerator has float64).
    rows, n = rows.cpu(), len(inputs["labels"])
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, token_losses.cpu().double())
    return sums, torch.bincount(rows, minlength=n)


def _report(results: Sequence[tuple[str, float, int]], skipped: int, truncated: int) -> dict[str, Any]:
    groups: dict[str, list[tuple[float, int]]] = {ALL: []}
    for task in sorted({task for task, _, _ in results}):
        groups[task] = []
    for task, loss_sum, n_tokens in results:
        groups[ALL].append((loss_sum, n_tokens))
        groups[task].append((loss_sum, n_tokens))
    return {
        "loss_mean": {k: sum(s / n for s, n in v) / len(v) for k, v in groups.items()},
        "loss_token_weighted": {k: sum(s for s, _ in v) / sum(n for _, n in v) for k, v in groups.items()},
        "counts": {k: len(v) for k, v in groups.items()},
        "tokens": {k: sum(n for _, n in v) for k, v in groups.items()},
        "skipped": skipped,
        "truncated": truncated,
    }


# ---------------------------------------------------------------------------------------- the command's pieces
def load_model(base: str, adapter: str | None, dtype: str, device: str) -> torch.nn.Module:
    """Base model from a directory or Hub id (in ``dtype``, a name of `DTYPES`), with the adapter when given.

    Importing this module imported the ``uti_peft`` package, which registers the method with peft when peft
    is imported, so ``PeftModel.from_pretrained`` knows the adapter type.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device)


def summary(report: dict[str, Any], max_seq_len: int) -> str:
    """One line: examples, tokens, truncated and skipped examples, and the mean loss over all."""
    return (
        f"{report['counts'][ALL]} examples, {report['tokens'][ALL]} scored tokens, {report['truncated']} truncated "
        f"to {max_seq_len} tokens, {report['skipped']} skipped; loss_mean {report['loss_mean'][ALL]:.6f}"
    )


