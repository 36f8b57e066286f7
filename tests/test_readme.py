"""The README's Quickstart and its offline walkthrough run as written, top to bottom, in a fresh directory; the
walkthrough twice, warning-free, in a directory git ignores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"
README = (REPO / "README.md").read_text()


def block_after(heading: str, language: str) -> str:
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_top_to_bottom(tmp_path):
    code = block_after("Quickstart", "python")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable params: 73,728" in run.stdout  # 576 new rows x 64, in the embedding and in the head
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-merged" / "model.safetensors").is_file()
    # peft 0.21 calling a deprecated transformers 5 property (the CLI filters it too) is the one warning left
    warnings = [line for line in run.stderr.splitlines() if "Warning:" in line]
    assert all("`is_gradient_checkpointing` is deprecated" in line for line in warnings), warnings
    assert run.stdout.splitlines()[-1].startswith("Describe this picture:")  # the pipeline's text
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "my-merged")  # a complete checkpoint: its tokenizer fits
    assert len(tokenizer) == AutoConfig.from_pretrained(tmp_path / "my-merged").vocab_size == 1576


def run_walkthrough(cwd: Path) -> None:
    script = block_after("Try every command offline", "bash")
    cli = str(Path(sys.executable).parent / "uti-peft")
    for line in script.strip().splitlines():
        command = line.split("  #", 1)[0].strip().replace("uti-peft ", f"{cli} ")
        run = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, (command, run.stderr[-3000:])
        assert "warning" not in run.stderr.lower(), (command, run.stderr[-3000:])


def test_offline_walkthrough_runs_as_written_twice_without_warnings(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    for _ in range(2):  # its first line resets what the first run wrote
        run_walkthrough(tmp_path)
    assert "try/" in (REPO / ".gitignore").read_text().splitlines()
    assert (tmp_path / "try" / "report.json").is_file()
    assert (tmp_path / "try" / "merged" / "config.json").is_file()
    assert (tmp_path / "try" / "converted" / "adapter_model.safetensors").is_file()
    try_dir = tmp_path / "try"
    base = AutoModelForCausalLM.from_pretrained(try_dir / "base")
    trained = PeftModel.from_pretrained(base, try_dir / "run").eval()

    # the report's numbers, recomputed here: each example's mean loss over its scored labels, averaged per task
    report = json.loads((try_dir / "report.json").read_text())
    losses: dict[str, list[float]] = {}
    with torch.no_grad():
        for line in (tmp_path / "examples" / "tiny_eval.jsonl").read_text().splitlines():
            example = json.loads(line)
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            loss = trained(input_ids=ids, labels=labels).loss.item()
            losses.setdefault(example["task"], []).append(loss)
            losses.setdefault("all", []).append(loss)
    assert report["counts"] == {task: len(values) for task, values in losses.items()}
    assert report["loss_mean"] == pytest.approx({t: sum(v) / len(v) for t, v in losses.items()}, rel=1e-5)

    # the merged checkpoint gives PeftModel's logits; the converted adapter holds the trained rows
    vocab_size = trained.peft_config["default"].vocab_size
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(try_dir / "merged").eval()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, trained(input_ids=ids).logits)
    rows, converted = load_file(try_dir / "run" / WEIGHTS), load_file(try_dir / "converted" / WEIGHTS)
    assert rows and sorted(converted) == sorted(rows)
    assert all(converted[k].dtype == rows[k].dtype and torch.equal(converted[k], rows[k]) for k in rows)
