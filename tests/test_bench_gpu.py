"""`scripts/bench_gpu.py --quick --device cpu` runs every GPU-benchmark case on a tiny model, on the CPU, and
writes bench_gpu.json + bench_gpu.md; `scripts/bench_gpu.sh` runs it from a staged copy of the tree.

Only the report's shape and the deterministic facts are checked (digests, tokens, bytes), never a timing. The
expected bytes are computed here from the files the bench wrote (the adapter's and the merged model's safetensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench_gpu.py"
TABLE_HEADER = "| measurement | uti-peft | reference | ratio |"
CASES = ("load-ours", "load-merged", "load-legacy", "load-legacy-mean", "inference", "train-ours", "train-legacy")
FLOAT32_BYTES = 4  # AdamW's per-parameter `step` is a float32 scalar tensor


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bench_gpu")
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--out", str(tmp / "out"),
         "--workdir", str(tmp / "work")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return tmp


def report_of(out: Path) -> dict:
    return json.loads((out / "bench_gpu.json").read_text())


def tensor_bytes(path: Path) -> dict[str, int]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).nbytes for name in f.keys()}


def test_json_schema(quick_run):
    report = report_of(quick_run / "out")
    assert report["complete"] is True and report["ok"] is True
    assert report["failures"] == [] and report["setup_error"] is None
    for key in ("torch", "transformers", "peft", "cuda_build", "device", "cpu_model"):
        assert key in report["machine"]
    assert report["machine"]["device"]["name"] == "cpu"
    assert report["parameters"]["device"] == "cpu" and report["parameters"]["quick"] is True
    assert set(report["setup_s"]) == {"build_base_s", "save_base_s", "get_peft_model_s", "save_adapter_s",
                                      "merge_adapter_s", "export_legacy_s"}
    for case in CASES:
        assert len(report["raw"][case]) == 1, case
    for kind in ("ours", "merged", "legacy", "legacy-mean"):
        assert {"seconds", "load_s", "forward_s", "peak_memory_bytes"} <= set(report["medians"]["load"][kind])
    assert set(report["ratios"]) >= {"load_ours_over_merged", "load_ours_over_legacy", "prefill_ours_over_merged",
                                     "decode_ours_over_merged", "train_step_ours_over_legacy"}
    assert all(value is not None for value in report["ratios"].values())
    assert sorted(p.name for p in (quick_run / "out").iterdir()) == ["bench_gpu.json", "bench_gpu.md"]


def test_logits_and_tokens_are_identical(quick_run):
    raw = report_of(quick_run / "out")["raw"]
    digests = {case: raw[case][0]["logits_sha256"] for case in CASES if case.startswith("load-")}
    assert len(set(digests.values())) == 1, digests
    inference = raw["inference"][0]
    assert inference["same_tokens"] is True
    assert inference["tokens"]["ours"] == inference["tokens"]["merged"]
    assert report_of(quick_run / "out")["exactness"]["logits_identical"] is True


def test_training_state_is_the_rows(quick_run):
    report = report_of(quick_run / "out")
    rows = tensor_bytes(quick_run / "work" / "adapter" / "adapter_model.safetensors")
    ours = report["raw"]["train-ours"][0]
    assert ours["grad_bytes"] == sum(rows.values())
    # gradient + the two AdamW moments of each row block, plus AdamW's step scalar per parameter
    assert ours["state_bytes"] == 3 * sum(rows.values()) + FLOAT32_BYTES * len(rows)
    merged = tensor_bytes(quick_run / "work" / "merged" / "model.safetensors")
    legacy = report["raw"]["train-legacy"][0]
    assert legacy["grad_bytes"] == merged["model.embed_tokens.weight"] + merged["lm_head.weight"]
    assert report["exactness"]["ours_state_is_3x_rows_plus_step_scalars"] is True


def test_markdown_table(quick_run):
    report = report_of(quick_run / "out")
    lines = (quick_run / "out" / "bench_gpu.md").read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2
    body = [line for line in lines[start:] if line.startswith("| ")]
    assert len(body) == len(report["table"])
    for row, line in zip(report["table"], body):
        assert line.startswith(f"| {row['measurement']} |") and line.count(" | ") == 3
    text = "\n".join(body)
    for measurement in ("ours vs merged checkpoint", "ours vs legacy recipe (mean_resizing=False)", "prefill",
                        "decode", "training step", "gradient + optimizer state", "logits sha256", "greedy tokens"):
        assert measurement in text
    assert text.count("| identical |") == 2


def test_shell_script_runs_from_a_staged_tree(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), str(tmp_path), "--quick", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_gpu.json", "bench_gpu.log", "bench_gpu.md"]
    report = report_of(tmp_path)
    assert report["ok"] is True
    assert not report["machine"]["uti_peft_path"].startswith(str(ROOT))  # the staged copy, not the tree
    assert TABLE_HEADER in (tmp_path / "bench_gpu.log").read_text()


def test_shell_script_needs_an_outdir():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh")], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr


def test_a_failed_case_is_reported_and_the_rest_kept(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench.gpu.cli import params_from_args, parse_args
    from bench.gpu.report import Run

    run = Run(params_from_args(parse_args(["--quick", "--device", "cpu"])), tmp_path, tmp_path / "work", {"cpu_model": "x", "cores_usable": 1,
                  "torch": "t", "transformers": "t", "peft": "p"})
    run.add([{"case": "load-ours", "seconds": 2.0, "logits_sha256": "a"},
             {"case": "load-merged", "seconds": 1.0, "logits_sha256": "a"},
             {"case": "load-legacy", "failed": "exit 1: RuntimeError: boom", "timed_out": False}])
    report = report_of(tmp_path)
    assert report["ok"] is False and report["ratios"]["load_ours_over_merged"] == 2.0
    assert report["failures"] == [{"case": "load-legacy", "failed": "exit 1: RuntimeError: boom", "timed_out": False}]
    assert "**Failed**: load-legacy: exit 1: RuntimeError: boom" in (tmp_path / "bench_gpu.md").read_text()

    # the mean-resizing legacy load is informational: its timeout is reported, the run is still ok
    optional = Run(run.params, tmp_path / "optional", tmp_path / "work", run.machine)
    optional.add([{"case": "load-legacy-mean", "failed": "killed after its 60 s limit", "timed_out": True}])
    report = report_of(tmp_path / "optional")
    assert report["ok"] is True and report["failures"][0]["timed_out"] is True
