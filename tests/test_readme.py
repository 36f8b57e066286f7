"""The README's Quickstart and its offline walkthrough run as written, top to bottom, in a fresh directory; the
walkthrough twice, warning-free, in a directory git ignores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
