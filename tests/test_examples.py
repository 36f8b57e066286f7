"""The shipped examples/ data is what scripts/make_tiny_data.py writes, and valid for the tiny token space."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from uti_peft.data import read_jsonl
from uti_peft.tiny import tiny_token_space

REPO = Path(__file__).resolve().parents[1]


def test_shipped_examples_are_reproducible_and_valid(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_data.py"), str(tmp_path)], check=True, timeout=120)
    space = tiny_token_space()
    for name in ("tiny_train.jsonl", "tiny_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "examples" / name).read_bytes()
        examples = read_jsonl(REPO / "examples" / name)
        assert {e.task for e in examples} == {"t2i", "t2a", "i2t", "a2t"}
        for example in examples:
            ids = example.input_ids
            assert all(0 <= i < space.vocab_size for i in ids)
            scored = [i for i, label in zip(ids, example.labels) if label != -100]
            assert scored and scored[-1] in space.special_tokens.values()  # each output ends with its end token
