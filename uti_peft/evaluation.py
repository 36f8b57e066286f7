"""Loss evaluation on tokenized multimodal data: the function behind ``uti-peft eval``.

The data is our users' tokenized JSONL (one object per line with ``task``, ``input_ids`` and optionally
``labels``; other fields are metadata and ignored). The report keeps the schema their evaluation
already produces (``loss_mean`` and ``counts`` keyed by ``all`` and each task) and adds token-weighted
means. Losses are computed per token with ``reduction="none"`` and summed per example, so padding a
batch never changes an example's numbers: batch size only changes speed.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .constants import TOKEN_SPACE_NAME
from .data import (
    ALL,
    DEFAULT_MAX_SEQ_LEN,
    IGNORE_INDEX,
    TRUNCATION_SIDES,
    PaddingCollator,
    add_data_arguments,
    check_window,
    positive_int,
    prepare,
    read_jsonl,
    scored_token_losses,
)
from .data import Example as EvalExample
from .token_space import TokenSpace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Re-exported: the JSONL reader and its constants moved to uti_peft.data, where training shares them.
__all__ = ["ALL", "DEFAULT_MAX_SEQ_LEN", "DTYPES", "IGNORE_INDEX", "TRUNCATION_SIDES", "EvalExample", "add_cli",
           "evaluate", "read_jsonl"]


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
    tokens), each keyed by ``all`` and every task, plus ``skipped``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_window(max_seq_len, truncation_side)
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
    return _report(results, skipped=len(prepared) - len(scorable))


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


def _report(results: Sequence[tuple[str, float, int]], skipped: int) -> dict[str, Any]:
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
    }


# ---------------------------------------------------------------------------------------- command line
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``uti-peft eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="mean loss per task on tokenized JSONL",
        description="Mean loss per task (and token-weighted) of a base model, with an adapter if given.",
    )
    parser.add_argument("--base", required=True, help="base model: local directory or hub id")
    parser.add_argument("--adapter", help="adapter directory or hub id; without it the base model is evaluated as is")
    parser.add_argument(
        "--token-space",
        help=f"token space JSON (default: the adapter's own, else {TOKEN_SPACE_NAME} in the base directory)",
    )
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the report JSON here (atomically) instead of printing it")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    examples = read_jsonl(args.data)
    model = _load_model(args.base, args.adapter, DTYPES[args.dtype], args.device)
    token_space = _token_space(args, model)
    report = evaluate(
        model,
        token_space,
        examples,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        truncation_side=args.truncation_side,
    )
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        _write_atomically(args.out, text)
    else:
        print(text, end="")
    return 0


def _token_space(args: argparse.Namespace, model: torch.nn.Module) -> TokenSpace:
    """``--token-space``, else the one the adapter was trained with, else the base directory's file."""
    if args.token_space:
        return TokenSpace.from_file(args.token_space)
    if args.adapter:
        return model.active_peft_config.get_token_space()
    path = os.path.join(args.base, TOKEN_SPACE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TOKEN_SPACE_NAME} in {args.base} and no adapter; pass --token-space")
    return TokenSpace.from_file(path)


def _load_model(base: str, adapter: str | None, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Base model from a directory or hub id, wrapped with the adapter when one is given.

    Importing this module already imported the ``uti_peft`` package, which registers the method with
    peft, so ``PeftModel.from_pretrained`` knows the adapter type.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device)


def _write_atomically(path: str, text: str) -> None:
    """Temp file in the same directory + ``os.replace``, so a reader never sees half a report."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
