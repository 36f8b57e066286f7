"""uti_peft.data: the JSONL examples' preparation, padding and scoring that evaluation and training share.

(Reading and its error messages are covered through ``uti_peft.evaluation.read_jsonl`` in test_evaluation.py.)
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from uti_peft import data, evaluation, training
from uti_peft.cli import commands as cli_commands
from uti_peft.data import IGNORE_INDEX, Example, PaddingCollator, prepare, scored_token_losses
from uti_peft.tiny import tiny_token_space

TS = tiny_token_space()
PAD = TS.pad_token_id


def test_evaluation_and_training_share_one_reader_and_one_preparation():
    assert evaluation.read_jsonl is data.read_jsonl is training.read_jsonl
    assert evaluation.EvalExample is data.Example
    assert training.prepare is data.prepare and training.PaddingCollator is data.PaddingCollator


def test_prepare_derives_labels_without_pad_and_truncates_either_side():
    ids = [1, PAD, 2, 3, 1001, PAD, 4]
    expected_labels = [1, IGNORE_INDEX, 2, 3, 1001, IGNORE_INDEX, 4]
    full = prepare(Example("t2i", ids), TS, 2048, "left")
    assert (full.input_ids, full.labels) == (ids, expected_labels)
    left = prepare(Example("t2i", ids), TS, 3, "left")
    right = prepare(Example("t2i", ids), TS, 3, "right")
    assert (left.input_ids, left.labels) == (ids[-3:], expected_labels[-3:])
    assert (right.input_ids, right.labels) == (ids[:3], expected_labels[:3])


def test_prepare_keeps_given_labels_and_checks_their_ids():
    ids, labels = [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    prepared = prepare(Example("a2t", ids, labels), TS, 2048, "left")
    assert prepared.labels == labels and prepared.has_scored_tokens
    # the first label is never scored (nothing predicts it): right truncation can leave nothing to score
    assert not prepare(Example("a2t", ids, labels), TS, 2, "right").has_scored_tokens
    with pytest.raises(ValueError, match=r"src:9: labels has token id 1576"):
        prepare(Example("a2t", ids, [IGNORE_INDEX, 6, 7, TS.vocab_size], source="src:9"), TS, 2048, "left")


def test_check_window_refuses_unusable_settings():
    data.check_window(2, "right")
    with pytest.raises(ValueError, match="max_seq_len"):
        data.check_window(1, "left")
    with pytest.raises(ValueError, match="truncation_side"):
        data.check_window(8, "middle")


def test_collator_right_pads_and_indexes_tasks():
    examples = [prepare(Example("t2i", [1, 2, 3]), TS, 2048, "left"), prepare(Example("a2t", [4]), TS, 2048, "left")]
    batch = PaddingCollator(PAD, tasks=["a2t", "t2i"])(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch[data.TASK_INDEX_KEY].tolist() == [1, 0]
    assert data.TASK_INDEX_KEY not in PaddingCollator(PAD)(examples)  # evaluation's batches carry model inputs only


def test_scored_token_losses_are_the_shifted_cross_entropy_per_row():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    labels = torch.tensor([[3, 4, IGNORE_INDEX, 5, 6], [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    losses, rows = scored_token_losses(logits, labels)
    assert rows.tolist() == [0, 0, 0]  # row 1 scores nothing after the shift
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert losses.sum().item() == pytest.approx(expected.item(), rel=1e-6)


def test_shared_command_line_options(capsys):
    parser = argparse.ArgumentParser()
    cli_commands.add_data_arguments(parser)
    args = parser.parse_args(["--data", "d.jsonl"])
    assert (args.data, args.max_seq_len, args.truncation_side) == ("d.jsonl", 2048, "left")
    for bad, message in (
        (["--data", "d.jsonl", "--max-seq-len", "0"], "argument --max-seq-len: must be a positive integer, got 0"),
        (["--data", "d.jsonl", "--max-seq-len", "x"], "argument --max-seq-len: expected an integer, got 'x'"),
        (["--data", "d.jsonl", "--truncation-side", "middle"], "argument --truncation-side: invalid choice: 'middle'"),
        ([], "the following arguments are required: --data"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, bad


def test_task_list_is_sorted_and_unique():
    assert data.task_list([Example("t2i", [1]), Example("a2t", [1]), Example("t2i", [2])]) == ["a2t", "t2i"]
