"""uti_peft.evaluation against a direct, one-example-at-a-time computation with a legacy-patched model."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from uti_peft.cli import build_parser
from uti_peft.evaluation import EvalExample, evaluate, read_jsonl
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

from conftest import legacy_patch

TS = tiny_token_space()
PAD = TS.pad_token_id


def legacy_patched_model(seed=0):
    """A tiny base patched the way our users' loader does it, with random new rows."""
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = 64  # build_tiny_qwen3's default
    input_rows = torch.randn(TS.num_new_rows, hidden, generator=generator) * 0.02
    output_rows = torch.randn(TS.num_new_rows, hidden, generator=generator) * 0.5
    return legacy_patch(build_tiny_qwen3(seed=seed), TS, input_rows, output_rows).eval()


@pytest.fixture(scope="module")
def model():
    return legacy_patched_model()


def make_examples(seed=0):
    """Mixed tasks and lengths in the users' layouts, some with pad tokens inside, some with labels."""
    rng = random.Random(seed)
    sp = TS.special_tokens
    examples = []
    for i in range(10):
        n = rng.randrange(3, 20)
        text, image = random_text(rng, n), random_image(rng, n + 4)
        layouts = {
            "t2i": [sp["<|text_start|>"], *text, sp["<|text_end|>"], sp["<|gen_img|>"], sp["<|img_start|>"],
                    *image, sp["<|img_end|>"]],
            "a2t": [sp["<|aud_start|>"], *random_audio(rng, n // 2 + 1), sp["<|aud_end|>"], sp["<|gen_text|>"],
                    sp["<|text_start|>"], *text, sp["<|text_end|>"]],
            "i2t": [sp["<|img_start|>"], *image, sp["<|img_end|>"], sp["<|gen_text|>"], sp["<|text_start|>"],
                    *text, sp["<|text_end|>"]],
        }
        task = ("t2i", "a2t", "i2t")[i % 3]
        ids = layouts[task]
        if i == 4:
            ids = [PAD, PAD, *ids]  # pad tokens inside the data are not scored
        labels = None
        if i in (2, 7):  # score only the answer, as a prompt-masked dataset does
            answer = len(ids) // 2
            labels = [-100] * answer + ids[answer:]
        examples.append(EvalExample(task=task, input_ids=ids, labels=labels, source=f"ex{i}"))
    return examples


def random_text(rng, n):
    return [rng.randrange(TS.text_vocab_size) for _ in range(n)]


def random_image(rng, n):
    return [TS.image_code_to_id(rng.randrange(256)) for _ in range(n)]


def random_audio(rng, steps):
    return [TS.audio_code_to_id(codebook, rng.randrange(64)) for _ in range(steps) for codebook in range(4)]


def expected_report(model, examples, max_seq_len, side):
    """Independent computation: one example at a time, plain tensors, transformers' own loss for the mean."""
    per_example, skipped, truncated = [], 0, 0
    for ex in examples:
        ids = torch.tensor(ex.input_ids)
        labels = torch.tensor(ex.labels) if ex.labels is not None else torch.where(ids == PAD, -100, ids)
        if len(ids) > max_seq_len:
            truncated += 1
            keep = slice(len(ids) - max_seq_len, None) if side == "left" else slice(0, max_seq_len)
            ids, labels = ids[keep], labels[keep]
        with torch.no_grad():
            out = model(input_ids=ids[None], labels=labels[None])
            token_losses = F.cross_entropy(out.logits[0, :-1], labels[1:], reduction="none", ignore_index=-100)
        n_tokens = int((labels[1:] != -100).sum())
        if n_tokens == 0:  # e.g. right truncation cut off the whole answer
            skipped += 1
            continue
        assert out.loss.item() == pytest.approx(token_losses.sum().item() / n_tokens, rel=1e-6, abs=1e-6)
        per_example.append((ex.task, out.loss.item(), token_losses.sum().item(), n_tokens))
    keys = ["all", *sorted({t for t, *_ in per_example})]
    rows = {k: [r for r in per_example if k in ("all", r[0])] for k in keys}
    return {
        "loss_mean": {k: sum(r[1] for r in v) / len(v) for k, v in rows.items()},
        "loss_token_weighted": {k: sum(r[2] for r in v) / sum(r[3] for r in v) for k, v in rows.items()},
        "counts": {k: len(v) for k, v in rows.items()},
        "tokens": {k: sum(r[3] for r in v) for k, v in rows.items()},
        "skipped": skipped,
        "truncated": truncated,
    }


def assert_numbers_match(report, expected):
    """Counts exactly, losses to 1e-6 (relative for losses above 1: float32 resolution at ~10 is ~1e-6)."""
    assert (report["counts"], report["skipped"]) == (expected["counts"], expected["skipped"])
    assert report["truncated"] == expected["truncated"]
    assert report["tokens"] == expected["tokens"]
    for metric in ("loss_mean", "loss_token_weighted"):
        assert list(report[metric]) == list(expected[metric])
        for key, value in expected[metric].items():
            assert report[metric][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (metric, key)


@pytest.mark.parametrize("max_seq_len,side", [(2048, "left"), (24, "left"), (24, "right")])
def test_matches_direct_computation(model, max_seq_len, side):
    examples = make_examples()
    expected = expected_report(model, examples, max_seq_len, side)
    report = evaluate(model, TS, examples, batch_size=1, max_seq_len=max_seq_len, truncation_side=side,
                      progress=False)
    assert_numbers_match(report, expected)
    if max_seq_len == 2048:
        assert report["skipped"] == 0 and report["counts"] == {"all": 10, "a2t": 3, "i2t": 3, "t2i": 4}


def test_truncation_side_changes_the_numbers(model):
    examples = make_examples()
    left = evaluate(model, TS, examples, max_seq_len=24, truncation_side="left", progress=False)
    right = evaluate(model, TS, examples, max_seq_len=24, truncation_side="right", progress=False)
    assert left["loss_mean"]["all"] != pytest.approx(right["loss_mean"]["all"], abs=1e-4)
    assert left["tokens"]["all"] < evaluate(model, TS, examples, progress=False)["tokens"]["all"]


def test_batch_size_does_not_change_per_task_numbers(model):
    examples = make_examples(seed=3)
    one = evaluate(model, TS, examples, batch_size=1, progress=False)
    four = evaluate(model, TS, examples, batch_size=4, progress=False)
    assert_numbers_match(four, one)


def test_examples_without_scored_tokens_are_skipped(model):
    examples = make_examples()[:3] + [
        EvalExample(task="t2i", input_ids=[5]),
        EvalExample(task="i2t", input_ids=[5, 6, 7], labels=[5, -100, -100]),
    ]
    report = evaluate(model, TS, examples, batch_size=2, progress=False)
    assert report["skipped"] == 2
    assert_numbers_match(report, expected_report(model, examples, 2048, "left"))


def test_progress_bar_goes_to_stderr(model, capsys):
    evaluate(model, TS, make_examples()[:2], progress=True)
    captured = capsys.readouterr()
    assert "eval" in captured.err and "2/2" in captured.err
    assert captured.out == ""


def test_rejects_ids_outside_the_token_space(model):
    bad = EvalExample(task="t2i", input_ids=[1, TS.vocab_size], source="data.jsonl:7")
    with pytest.raises(ValueError, match=r"data\.jsonl:7.*1576"):
        evaluate(model, TS, [bad], progress=False)


def write_jsonl(path, examples):
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            obj = {"id": f"ex{i}", "task": ex.task, "input_ids": ex.input_ids, "length": len(ex.input_ids),
                   "source_dataset": "unit-test"}
            if ex.labels is not None:
                obj["labels"] = ex.labels
            f.write(json.dumps(obj) + "\n")


def test_read_jsonl_round_trip_and_ignores_metadata(tmp_path):
    examples = make_examples()
    path = tmp_path / "data.jsonl"
    write_jsonl(path, examples)
    read = read_jsonl(path)
    assert [(e.task, e.input_ids, e.labels) for e in read] == [(e.task, e.input_ids, e.labels) for e in examples]
    assert read[3].source == f"{path}:4"


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"task": "t2i", "input_ids": [1, 2', r"line 3: invalid JSON"),
        ('{"task": "t2i", "length": 2}', r"line 3: missing field 'input_ids'"),
        ('{"input_ids": [1, 2]}', r"line 3: missing field 'task'"),
        ('{"task": "t2i", "input_ids": [1, "2"]}', r"line 3: input_ids must be a list of integers"),
        ('{"task": "t2i", "input_ids": [1, 2], "labels": [1]}', r"line 3: labels has 1 entries"),
        ('{"task": "all", "input_ids": [1, 2]}', r"line 3: task must be"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"task": "t2i", "input_ids": [1, 2]})
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:" + message.replace("line ", "")) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def parse_eval(argv):
    return build_parser().parse_args(["eval", *argv])


def test_cli_defaults_and_validation(capsys):
    args = parse_eval(["--base", "b", "--data", "d.jsonl"])
    assert (args.batch_size, args.max_seq_len, args.truncation_side) == (1, 2048, "left")
    assert (args.adapter, args.out, args.dtype, args.device, args.token_space) == (None, None, "float32", "cpu", None)
    for bad, message in ((["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
                         (["--truncation-side", "middle"], "argument --truncation-side: invalid choice: 'middle'"),
                         (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'")):
        with pytest.raises(SystemExit) as exit_info:
            parse_eval(["--base", "b", "--data", "d.jsonl", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, bad


def test_cli_evaluates_a_saved_base_model(model, tmp_path, capsys):
    base = tmp_path / "legacy"
    model.save_pretrained(base)
    TS.save(base / "token_space.json")
    data = tmp_path / "data.jsonl"
    examples = make_examples()
    write_jsonl(data, examples)
    out = tmp_path / "report.json"

    args = parse_eval(["--base", str(base), "--data", str(data), "--batch-size", "3", "--max-seq-len", "24",
                       "--out", str(out)])
    assert args.run(args) == 0
    report = json.loads(out.read_text())
    assert_numbers_match(report, expected_report(model, examples, 24, "left"))
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []

    args = parse_eval(["--base", str(base), "--data", str(data), "--truncation-side", "right",
                       "--max-seq-len", "24"])
    capsys.readouterr()
    assert args.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert_numbers_match(printed, expected_report(model, examples, 24, "right"))


def test_cli_without_a_token_space_says_how_to_pass_one(model, tmp_path):
    base = tmp_path / "no-space"
    model.save_pretrained(base)
    data = tmp_path / "data.jsonl"
    write_jsonl(data, make_examples()[:1])
    args = parse_eval(["--base", str(base), "--data", str(data)])
    with pytest.raises(FileNotFoundError, match="--token-space"):
        args.run(args)
    args = parse_eval(["--base", str(base), "--data", str(data), "--token-space", str(tmp_path / "ts.json")])
    TS.save(tmp_path / "ts.json")
    assert args.run(args) == 0


def test_cli_evaluates_base_plus_adapter_like_the_legacy_model(tmp_path):
    from peft import get_peft_model

    import uti_peft
    from uti_peft.cli import main

    from conftest import legacy_model_for

    build_tiny_qwen3().save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=TS))
    peft_model.save_pretrained(tmp_path / "adapter")
    data, out = tmp_path / "data.jsonl", tmp_path / "report.json"
    examples = make_examples()
    write_jsonl(data, examples)

    argv = ["eval", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
            "--batch-size", "4", "--max-seq-len", "24", "--out", str(out)]
    assert main(argv) == 0
    legacy = legacy_model_for(tmp_path / "adapter", TS)
    assert_numbers_match(json.loads(out.read_text()), expected_report(legacy, examples, 24, "left"))
