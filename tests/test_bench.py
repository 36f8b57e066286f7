"""`scripts/bench.py --quick` runs every benchmark case on a tiny model and writes bench.json + bench.md.

Only the report's shape and the deterministic facts are checked (bytes, exactness), never a timing or a ratio.
The expected bytes are computed here from the files the bench wrote (the base's config.json, the token space,
the adapter file), never from the parameters the report echoes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from uti_peft.token_space import TokenSpace

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
    assert report["parameters"]["shape"]

    for section in ("setup_s", "load", "inference", "training", "size_and_conversion", "raw"):
        assert section in report
    sweep = [f"load-{kind}-{n}L" for n in (2, 3) for kind in ("ours", "merged")]  # --quick's depths: 2 and 3
    for case in (*sweep, "cache-2L", "cache-3L", "head-map", "head-copy", "head-plain", "load-legacy-nomean",
                 "load-legacy", "inference", "train-ours", "train-legacy", "convert-ours", "convert-plain",
                 "merge-ours-2L", "merge-peft-2L", "merge-floor-2L", "extract-2L", "switch", "head-loss-fused",
                 "head-loss-unfused", "load-peer-trainable-tokens", "load-peer-lora-modules-to-save",
                 "train-peer-trainable-tokens", "train-peer-lora-modules-to-save", "cache-tied", "load-ours-tied",
                 "load-legacy-nomean-tied", "load-peer-trainable-tokens-tied", "load-peer-lora-modules-to-save-tied",
                 "train-ours-tied", "train-peer-trainable-tokens-tied", "train-peer-lora-modules-to-save-tied"):
        assert report["raw"][case], case
    switch = report["switch"]
    assert switch["switch_s"] > 0 and switch["copy_s"] > 0 and switch["rows_bytes"] > 0
    fused, unfused = (report["raw"][f"head-loss-{kind}"][0] for kind in ("fused", "unfused"))
    assert fused["loss"] == pytest.approx(unfused["loss"], rel=1e-2)  # the same loss, two ways (bf16)
    assert fused["rows_grad_norm"] == pytest.approx(unfused["rows_grad_norm"], rel=5e-2)
    for case in (*sweep, "load-legacy-nomean"):
        for result in report["raw"][case]:
            assert {"seconds", "steady_rss_bytes", "peak_rss_bytes", "logits_sha256", "forwards_s"} <= set(result)
            assert len(result["forwards_s"]) == 5
    for case in sweep[::2]:  # ours: the load's phases
        for result in report["raw"][case]:
            assert {"base_s", "from_pretrained_s", "head_build_s", "peft_load_rows_s"} <= set(result["phases"])
    assert set(report["load"]["sweep"]) == {"2", "3"} and report["load"]["fit_merged"] is not None
    assert report["load"]["rss_method"]

    rows = report["table"]
    assert rows and all(
        set(row) >= {"measurement", "kind", "ours", "reference", "ratio", "target", "met", "unit"} for row in rows
    )
    targets = [row for row in rows if row["kind"] == "target"]
    assert len(targets) == report["targets_total"] == 25  # 13 + 2 x 6 against PEFT's own ways (issue #26)
    for title in ("peers, ", "peers (tied base), "):  # untied and tied bases
        peer_rows = [row for row in rows if row["measurement"].startswith(title)]
        assert [row["kind"] for row in peer_rows] == ["target", "target", "info", "target", "target", "target", "target"]
    # merge time: a target against the copy floor, PEFT's way beside it as information (issue #26)
    merge_rows = {row["measurement"]: row["kind"] for row in rows if row["measurement"].startswith("merge + write")}
    assert merge_rows == {
        "merge + write, 2 layer(s): uti-peft merge vs the copy floor (cp of the base + the rows)": "target",
        "merge + write, 2 layer(s) (s): uti-peft merge vs PEFT merge_and_unload + save_pretrained": "info",
    }
    assert all(isinstance(row["met"], bool) for row in targets)
    assert report["targets_met"] + len(report["targets_missed"]) == report["targets_total"]


def test_deterministic_facts(quick_run):
    report = json.loads((quick_run / "bench.json").read_text())
    work = quick_run / "work"
    config = json.loads((work / "base" / "config.json").read_text())
    space = TokenSpace.from_file(work / "token_space.json")
    hidden, dtype_bytes = config["hidden_size"], torch.finfo(getattr(torch, config["dtype"])).bits // 8
    rows_bytes = 2 * space.num_new_rows * hidden * dtype_bytes  # embedding + lm_head rows
    with safe_open(work / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    on_disk = sum(t.numel() * t.element_size() for t in tensors)
    assert on_disk == rows_bytes
    shape = {"vocab_size": space.vocab_size, "hidden": hidden}

    # the three ways of building the extended head hold the same text rows (the checksum reads all of them)
    checksums = {r["checksum"] for kind in ("map", "copy", "plain") for r in report["raw"][f"head-{kind}"]}
    assert len(checksums) == 1
    head_build = report["raw"]["head-plain"][0]
    assert head_build["text_bytes"] == space.text_vocab_size * hidden * dtype_bytes

    # the legacy load was ended by its own timer (not a crash, not the process timeout), before any logits; the
    # lower bound reported is the --legacy-timeout given above
    raw = report["raw"]
    assert [(r.get("timed_out"), r.get("killed_by"), "logits_sha256" in r) for r in raw["load-legacy"]] == [
        (True, "case time limit", False)]
    assert report["load"]["legacy_defaults"]["seconds_lower_bound"] == 0.001

    # the exactness verdicts, recomputed from the raw digests and tokens (each required to exist)
    def digests(case):
        found = [r.get("logits_sha256") for r in raw[case]]
        assert found and all(found), (case, found)
        return set(found)

    main = report["parameters"]["shape"]["layers"]
    for depth in (2, 3):
        assert len(digests(f"load-ours-{depth}L") | digests(f"load-merged-{depth}L")) == 1, depth
    assert digests("load-legacy-nomean") == digests(f"load-ours-{main}L")
    assert report["load"]["logits_identical_ours_merged_legacy"] is True
    # the tied variant: ours loads exactly the legacy recipe's model, and trains one set of rows (embedding = head)
    assert digests("load-legacy-nomean-tied") == digests("load-ours-tied")
    assert report["peers_tied"]["ours"]["logits_equal_legacy"] is True
    assert raw["train-ours-tied"][0]["grad_bytes"] == rows_bytes // 2
    assert json.loads((work / "tied" / "base" / "config.json").read_text())["tie_word_embeddings"] is True
    tokens = raw["inference"][0]["tokens"]
    assert len(tokens["ours"]) == 1 + report["parameters"]["decode_steps"] and tokens["ours"] == tokens["merged"]
    assert report["inference"]["same_greedy_tokens"] is True

    training = report["training"]
    assert training["rows_bytes"] == rows_bytes
    assert training["ours"]["grad_bytes"] == rows_bytes
    assert training["ours"]["state_bytes"] == 3 * rows_bytes + 8  # gradient + 2 AdamW moments + 2 step scalars
    assert training["legacy"]["grad_bytes"] == 2 * shape["vocab_size"] * shape["hidden"] * dtype_bytes

    merge = report["merge"]["layers"]["2"]
    # uti-peft merge writes exactly what PEFT's merge_and_unload saves (from the raw digests, each present)
    merged_digests = [r.get("tensors_sha256") for case in ("merge-ours-2L", "merge-peft-2L") for r in raw[case]]
    assert len(merged_digests) >= 2 and all(merged_digests) and len(set(merged_digests)) == 1
    assert merge["tensors_identical"] is True
    assert merge["extract_rows_identical"] is True  # extract gives the adapter's rows file back from the merged one
    assert report["merge"]["largest_merged_tensor_bytes"] == shape["vocab_size"] * shape["hidden"] * 2
    # the copy floor wrote every byte of the base and the adapter's rows (plus a safetensors header)
    base_bytes = sum(p.stat().st_size for p in (work / "base").iterdir() if p.is_file())
    floor = raw["merge-floor-2L"]
    assert floor and all(base_bytes + rows_bytes < r["written_bytes"] < base_bytes + rows_bytes + 4096 for r in floor)

    size = report["size_and_conversion"]
    assert size["rows_bytes"] == rows_bytes
    adapter_file = work / "adapter" / "adapter_model.safetensors"
    assert size["adapter_files"]["adapter_model.safetensors"] == adapter_file.stat().st_size
    assert size["modules_to_save_bytes"] == 2 * shape["vocab_size"] * shape["hidden"] * dtype_bytes


def test_markdown_table(quick_run):
    report = json.loads((quick_run / "bench.json").read_text())
    lines = (quick_run / "bench.md").read_text().splitlines()
    assert TABLE_HEADER in lines
    start = lines.index(TABLE_HEADER) + 2
    body = [line for line in lines[start:] if line.startswith("| ")]
    assert len(body) == len(report["table"])
    assert all(line.count(" | ") == 5 for line in body)
