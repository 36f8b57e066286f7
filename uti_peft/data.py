"""Our users' tokenized JSONL, shared by ``uti-peft eval`` and ``uti-peft train``.

One JSON object per line: ``task``, ``input_ids`` and optionally ``labels`` (``-100`` = not scored); other
fields (``id``, ``length``, metadata) are ignored. Reading, validating against the token space, truncating,
deriving labels, padding a batch and scoring logits against labels live here, once, so that training
optimises exactly the loss that evaluation reports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .constants import DEFAULT_MAX_SEQ_LEN, TRUNCATION_SIDES
from .token_space import TokenSpace

IGNORE_INDEX = -100
ALL = "all"  # reserved: evaluation reports use it as the key of the whole data set
TASK_INDEX_KEY = "task_index"


@dataclass(frozen=True)
class Example:
    """One tokenized example as read; ``source`` (``file:line``) names it in error messages."""

    task: str
    input_ids: list[int]
    labels: list[int] | None = None
    source: str = "example"


@dataclass(frozen=True)
class PreparedExample:
    """An example after validation and truncation, with the labels the loss is computed against."""

    task: str
    input_ids: list[int]
    labels: list[int]

    @property
    def has_scored_tokens(self) -> bool:
        """Whether any next-token prediction is scored (the first label never is: nothing predicts it)."""
        return any(label != IGNORE_INDEX for label in self.labels[1:])


# ---------------------------------------------------------------------------------------- reading
def read_jsonl(path: Union[str, os.PathLike]) -> list[Example]:
    """Read tokenized examples; a bad line raises ValueError naming the file and the line number."""
    path = os.fspath(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{line_no}"))
    return examples


def _parse_line(line: str, where: str) -> Example:
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
    return Example(task=task, input_ids=input_ids, labels=labels, source=where)


def _int_list(value: Any, field: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: {field} must be a list of integers")
    return value


# ---------------------------------------------------------------------------------------- preparing
def check_window(max_seq_len: int, truncation_side: str) -> None:
    """Refuse a window that leaves nothing to predict or a side that does not exist."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")


def prepare(example: Example, token_space: TokenSpace, max_seq_len: int, side: str) -> PreparedExample:
    """Check ids against the token space, truncate (``left`` keeps the end), and derive labels.

    Without ``labels`` every input token is scored except the pad token, so padding inside the data is
    never learned or measured.
    """
    check_ids(example.input_ids, token_space, f"{example.source}: input_ids")
    if example.labels is not None:
        check_ids([i for i in example.labels if i != IGNORE_INDEX], token_space, f"{example.source}: labels")
        labels = example.labels
    else:
        pad = token_space.pad_token_id
        labels = [IGNORE_INDEX if i == pad else i for i in example.input_ids]
    window = slice(-max_seq_len, None) if side == "left" else slice(0, max_seq_len)
    return PreparedExample(example.task, example.input_ids[window], labels[window])


def check_ids(ids: Sequence[int], token_space: TokenSpace, what: str) -> None:
    """Raise ValueError naming ``what`` for the first id outside ``[0, vocab_size)``."""
    bad = next((i for i in ids if not 0 <= i < token_space.vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} has token id {bad}, outside the token space (0..{token_space.vocab_size - 1})")


# ---------------------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads prepared examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors.

    Right padding keeps every real token at the position it has alone and the attention mask hides the
    padding, so an example's numbers do not depend on its batch. With ``tasks`` the batch also carries
    ``task_index`` (each example's position in ``tasks``), for per-task bookkeeping; it is not a model input.
    """

    pad_token_id: int
    tasks: Optional[Sequence[str]] = None

    def __call__(self, batch: Sequence[PreparedExample]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            labels[row, :length] = torch.tensor(example.labels)
            attention_mask[row, :length] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.tasks is not None:
            index = {task: i for i, task in enumerate(self.tasks)}
            out[TASK_INDEX_KEY] = torch.tensor([index[e.task] for e in batch], dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------- scoring
def scored_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each scored next-token prediction, and the batch row it belongs to.

    Labels are shifted by one as transformers does. Only scored positions are gathered and upcast to
    float32, which keeps the float32 copy of the logits small.
    """
    shift_labels = labels[:, 1:]
    scored = shift_labels != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1][scored].float(), shift_labels[scored], reduction="none")
    return losses, scored.nonzero()[:, 0]


def task_list(examples: Sequence[Union[Example, PreparedExample]]) -> list[str]:
    """The sorted task names of a data set: a fixed order every process derives alike."""
    return sorted({e.task for e in examples})


__all__ = [
    "ALL",
    "DEFAULT_MAX_SEQ_LEN",
    "IGNORE_INDEX",
    "TASK_INDEX_KEY",
    "TRUNCATION_SIDES",
    "Example",
    "PaddingCollator",
    "PreparedExample",
    "check_ids",
    "check_window",
    "prepare",
    "read_jsonl",
    "scored_token_losses",
    "task_list",
]
