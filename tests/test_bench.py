"""`scripts/bench.py --quick` runs every benchmark case on a tiny model and writes bench.json + bench.md.

Only the report's shape and the deterministic facts are checked (bytes, exactness), never a timing or a ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
TABLE_HEADER = "| measurement | ours | reference | ratio | target | met? |"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # a legacy timeout of 1 ms: exercises the path the full run takes (mean-resizing killed, lower bound reported)
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out), "--workdir", str(out / "work"),
         "--legacy-timeout", "0.001"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_help_is_fast_and_names_the_knobs():
    run = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    for flag in ("--quick", "--out", "--workdir", "--reps", "--layers", "--prefill-tokens", "--decode-steps",
                 "--train-seq-len", "--legacy-timeout"):
        assert flag in run.stdout


def test_json_schema(quick_run):
    report = json.loads((quick_run / "bench.json").read_text())
    machine = report["machine"]
    for key in ("cpu_model", "cores", "ram_bytes", "torch", "transformers", "peft"):
        assert machine[key]
    params = report["parameters"]
    assert params["quick"] is True and params["reps"] == 1 and params["dtype"] == "bfloat16"
    for key in ("prefill_tokens", "decode_steps", "train_seq_len", "train_steps", "legacy_timeout"):
        assert params[key] > 0
    shape = params["shape"]
    assert shape["vocab_size"] == shape["text_vocab"] + shape["new_rows"]

    for section in ("setup_s", "load", "inference", "training", "size_and_conversion", "raw"):
        assert section in report
    for case in ("load-ours", "load-merged", "load-legacy-nomean", "load-legacy", "inference", "train-ours",
                 "train-legacy", "convert-ours", "convert-plain", "merge-ours-2L", "merge-peft-2L"):
        assert report["raw"][case], case
    for case in ("load-ours", "load-merged", "load-legacy-nomean"):
        for result in report["raw"][case]:
            assert {"seconds", "steady_rss_bytes", "peak_rss_bytes", "logits_sha256"} <= set(result)
    assert report["load"]["rss_method"]

    rows = report["table"]
    assert rows and all(
        set(row) >= {"measurement", "kind", "ours", "reference", "ratio", "target", "met", "unit"} for row in rows
    )
    targets = [row for row in rows if row["kind"] == "target"]
    assert len(targets) == report["targets_total"] == 11
    assert all(isinstance(row["met"], bool) for row in targets)
    assert report["targets_met"] + len(report["targets_missed"]) == report["targets_total"]


def test_deterministic_facts(quick_run):
    report = json.loads((quick_run / "bench.json").read_text())
    shape = report["parameters"]["shape"]
    rows_bytes = 2 * shape["new_rows"] * shape["hidden"] * 2  # embedding + lm_head rows, bf16

    legacy = report["load"]["legacy_defaults"]
    assert legacy["timed_out"] is True and legacy["seconds_lower_bound"] == pytest.approx(0.001)
    assert report["load"]["logits_identical_ours_merged_legacy"] is True
    assert report["inference"]["same_greedy_tokens"] is True

    training = report["training"]
    assert training["rows_bytes"] == rows_bytes
    assert training["ours"]["grad_bytes"] == rows_bytes
    assert training["ours"]["state_bytes"] == training["expected_ours_state_bytes"] == 3 * rows_bytes + 8
    assert training["legacy"]["grad_bytes"] == 2 * shape["vocab_size"] * shape["hidden"] * 2

    merge = report["merge"]["layers"]["2"]
    assert merge["tensors_identical"] is True  # uti-peft merge writes exactly what PEFT's merge_and_unload saves
    assert report["merge"]["largest_merged_tensor_bytes"] == shape["vocab_size"] * shape["hidden"] * 2

    size = report["size_and_conversion"]
    assert size["rows_bytes"] == rows_bytes
    assert size["adapter_files"]["adapter_model.safetensors"] > rows_bytes
    assert size["modules_to_save_bytes"] == 2 * shape["vocab_size"] * shape["hidden"] * 2


def test_markdown_table(quick_run):
    report = json.loads((quick_run / "bench.json").read_text())
    lines = (quick_run / "bench.md").read_text().splitlines()
    assert TABLE_HEADER in lines
    start = lines.index(TABLE_HEADER) + 2
    body = [line for line in lines[start:] if line.startswith("| ")]
    assert len(body) == len(report["table"])
    assert all(line.count(" | ") == 5 for line in body)
