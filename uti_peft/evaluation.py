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
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TOKEN_SPACE_NAME
from .token_space import TokenSpace

IGNORE_INDEX = -100
ALL = "all"
DEFAULT_MAX_SEQ_LEN = 2048
TRUNCATION_SIDES = ("left", "right")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvalExample:
    """One tokenized example; ``source`` (``file:line``) names it in error messages."""

    task: str
    input_ids: list[int]
    labels: list[int] | None = None
    source: str = "example"


@dataclass(frozen=True)
class _Prepared:
    """An example after truncation, with the labels the loss is computed against."""

    task: str
    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------------------------------- reading
def read_jsonl(path: Union[str, os.PathLike]) -> list[EvalExample]:
    """Read tokenized examples; a bad line raises ValueError naming the file and the line number."""
    path = os.fspath(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{line_no}"))
    return examples


def _parse_line(line: str, where: str) -> EvalExample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    for field in ("task", "input_ids"):
        if field not in obj:
            raise ValueError(f"{where}: missing field {field!r}")
    task = obj["task"]
    if not isinstance(task, str) or not task or task == ALL:
        raise ValueError(f"{where}: task must be a non-empty string other than {ALL!r}, found {task!r}")
    input_ids = _int_list(obj["input_ids"], "input_ids", where)
    if not input_ids:
        raise ValueError(f"{where}: input_ids is empty")
    labels = obj.get("labels")
    if labels is not None:
        labels = _int_list(labels, "labels", where)
        if len(labels) != len(input_ids):
            raise ValueError(f"{where}: labels has {len(labels)} entries but input_ids has {len(input_ids)}")
    return EvalExample(task=task, input_ids=input_ids, labels=labels, source=where)


def _int_list(value: Any, field: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: {field} must be a list of integers")
    return value


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
    if batch_size < 1 or max_seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and max_seq_len >= 2, got {batch_size} and {max_seq_len}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    prepared = [_prepare(e, token_space, max_seq_len, truncation_side) for e in examples]
    scorable = [e for e in prepared if any(label != IGNORE_INDEX for label in e.labels[1:])]
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once.
    scorable.sort(key=lambda e: len(e.input_ids), reverse=True)

    model.eval()
    device = next(model.parameters()).device
    results: list[tuple[str, float, int]] = []
    with torch.inference_mode(), tqdm(total=len(scorable), desc="eval", unit="example", disable=not progress) as bar:
        for start in range(0, len(scorable), batch_size):
            batch = scorable[start : start + batch_size]
            sums, counts = _score_batch(model, batch, token_space.pad_token_id, device)
            results.extend((e.task, s, n) for e, s, n in zip(batch, sums.tolist(), counts.tolist()))
            bar.update(len(batch))
    if not results:
        raise ValueError("no example has a token to score (every example is empty or fully ignored)")
    return _report(results, skipped=len(prepared) - len(scorable))


def _prepare(example: EvalExample, token_space: TokenSpace, max_seq_len: int, side: str) -> _Prepared:
    """Check ids against the token space, truncate, and derive labels (pad tokens are never scored)."""
    _check_ids(example.input_ids, token_space, f"{example.source}: input_ids")
    if example.labels is not None:
        _check_ids([i for i in example.labels if i != IGNORE_INDEX], token_space, f"{example.source}: labels")
        labels = example.labels
    else:
        pad = token_space.pad_token_id
        labels = [IGNORE_INDEX if i == pad else i for i in example.input_ids]
    window = slice(-max_seq_len, None) if side == "left" else slice(0, max_seq_len)
    return _Prepared(example.task, example.input_ids[window], labels[window])


def _check_ids(ids: Sequence[int], token_space: TokenSpace, what: str) -> None:
    bad = next((i for i in ids if not 0 <= i < token_space.vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} has token id {bad}, outside the token space (0..{token_space.vocab_size - 1})")


def _score_batch(
    model: torch.nn.Module, batch: Sequence[_Prepared], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of a right-padded batch: (sum of token losses, number of scored tokens).

    Right padding keeps every real token at the positions it has alone, and the attention mask hides
    the padding from it, so the numbers match batch size 1.
    """
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1

    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    shift_labels = labels[:, 1:].to(device)
    scored = shift_labels != IGNORE_INDEX
    # Only scored positions are gathered and upcast, which keeps the float32 copy of the logits small.
    token_losses = F.cross_entropy(logits[:, :-1][scored].float(), shift_labels[scored], reduction="none")
    # Summed in float64 on the CPU (not every accelerator has float64).
    rows = scored.nonzero()[:, 0].cpu()
    sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, token_losses.cpu().double())
    return sums, scored.sum(dim=1).cpu()


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
    parser.add_argument("--data", required=True, help="tokenized JSONL (task, input_ids, optional labels)")
    parser.add_argument(
        "--token-space",
        help=f"token space JSON (default: the adapter's own, else {TOKEN_SPACE_NAME} in the base directory)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--max-seq-len", type=_positive_int, default=DEFAULT_MAX_SEQ_LEN)
    parser.add_argument("--truncation-side", choices=TRUNCATION_SIDES, default="left")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the report JSON here (atomically) instead of printing it")
    parser.set_defaults(run=_run_eval)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
