"""``uti-peft train --deepspeed`` (transformers' Trainer with a DeepSpeed config) on 2 CPU processes (gloo, started by
torchrun) against one process with the same global batch: the rows, the head's weight tail after training, the text
rows, the saved adapter, and resuming from a DeepSpeed checkpoint. Skipped where deepspeed is not installed.

DeepSpeed compiles a small C++ extension at its first communication set-up (~80 s on 2 cores); set
``TORCH_EXTENSIONS_DIR`` to a kept folder to compile it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME  # noqa: E402
from uti_peft.tiny import build_tiny_qwen3  # noqa: E402
from uti_peft.training import train  # noqa: E402

from conftest import TEXT_VOCAB  # noqa: E402
from test_evaluation import write_jsonl  # noqa: E402
from test_training import REPO, examples, free_port, parse  # noqa: E402,F401

CONFIGS = {"zero2": os.path.join(REPO, "scripts", "deepspeed", "zero2.json")}
HEAD = "base_model.model.lm_head.row_extension_output_rows.default"
INPUT = "base_model.model.model.embed_tokens.row_extension_input_rows.default"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, examples):
    """One process, batch 2 (the whole data set), 2 AdamW steps, fp32, rows only; new rows start from the mean of
    the text rows (``--init-rows mean``: no random draw, so every launch starts alike). Returns the options every
    run shares and the reference's rank state."""
    directory = tmp_path_factory.mktemp("deepspeed_reference")
    data = directory / "two.jsonl"
    write_jsonl(data, [examples[0], examples[1]])
    common = ["--tiny", "--data", str(data), "--cpu", "--no-progress", "--learning-rate", "1e-2", "--logging-steps",
              "1", "--max-steps", "2", "--init-rows", "mean"]
    train(parse(*common, "--output-dir", directory / "out", "--batch-size", "2", "--save-steps", "0",
                "--rank-state-dir", directory / "ranks"))
    return common, load_file(directory / "ranks" / "rank0.safetensors")


def torchrun(args, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(REPO, "scripts", "train.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, reference):
    """The 2-process run of each mode, once (batch 1 per process, a checkpoint after step 1)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            directory = tmp_path_factory.mktemp(mode)
            out, ranks = directory / "out", directory / "ranks"
            proc = torchrun([*reference[0], "--deepspeed", CONFIGS[mode], "--output-dir", out, "--batch-size", "1",
                             "--save-steps", "1", "--rank-state-dir", ranks])
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[mode] = out, ranks
        return runs[mode]

    return get


def rank_states(directory):
    states = []
    for rank in (0, 1):
        path = directory / f"rank{rank}.safetensors"
        with safe_open(str(path), "pt") as f:
            states.append((f.metadata(), load_file(path)))
    return states


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_two_deepspeed_processes_match_one(reference, launched, mode):
    _, single = reference
    out, rank_dir = launched(mode)
    (meta0, rank0), (meta1, rank1) = rank_states(rank_dir)
    assert [m["distributed_type"] for m in (meta0, meta1)] == ["DEEPSPEED", "DEEPSPEED"]
    assert [m["world_size"] for m in (meta0, meta1)] == ["2", "2"] and meta0["global_step"] == "2"
    assert sorted(rank0) == sorted(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    # the rows equal one process's: a lost gradient average would move them by ~1e-3 (lr 1e-2, Adam's first steps)
    for name in (INPUT, HEAD):
        error = (rank0[name] - single[name]).abs().max().item()
        assert error <= 1e-5, (name, error)
    # after training the head's weight tail (what its matmul reads, and any state dict) is the trained rows
    assert torch.equal(rank0[f"tail.{HEAD}"], rank0[HEAD])
    assert meta0["rows_attached"] == "True"
    # the text rows of the head are the base's, bit for bit (the untied embedding's base weight is never changed)
    fresh = build_tiny_qwen3()
    assert torch.equal(rank0[f"weight.{HEAD}"][:TEXT_VOCAB], fresh.lm_head.weight[:TEXT_VOCAB])

    # the adapter rank 0 saved: the rows only, the trained ones
    saved = load_file(out / WEIGHTS_NAME)
    assert sorted(saved) == [INPUT_ROWS_KEY, OUTPUT_ROWS_KEY]
    assert torch.equal(saved[OUTPUT_ROWS_KEY], rank0[HEAD]) and torch.equal(saved[INPUT_ROWS_KEY], rank0[INPUT])


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_resume_from_a_deepspeed_checkpoint_continues_exactly(tmp_path, reference, launched, mode):
    """Step 1's DeepSpeed checkpoint resumed for step 2 ends bit-identical to the straight run; the resumed run starts
    from other rows (random ones, ``--init-rows mean_noise``), so only the checkpoint can make it match."""
    out, _ = launched(mode)
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / WEIGHTS_NAME).is_file() and any(p.name.startswith("global_step") for p in checkpoint.iterdir())
    common = [*reference[0], "--init-rows", "mean_noise"]
    proc = torchrun([*common, "--deepspeed", CONFIGS[mode], "--output-dir", tmp_path / "resumed", "--batch-size", "1",
                     "--save-steps", "0", "--resume-from-checkpoint", checkpoint])
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight, resumed = load_file(out / WEIGHTS_NAME), load_file(tmp_path / "resumed" / WEIGHTS_NAME)
    assert sorted(straight) == sorted(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["global_step"] == 2
