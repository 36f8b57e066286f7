"""``uti-peft train --deepspeed`` (transformers' Trainer with a DeepSpeed config) on 2 CPU processes (gloo, started by
torchrun) against one process with the same global batch: the rows, the head's weight tail after training, the text
rows, the saved adapter, ZeRO-3's consolidated 16-bit state dict, and resuming from a DeepSpeed checkpoint. ZeRO-3 runs
twice: on the tiny base built in each process (partitioned by ``deepspeed.initialize``) and on the same base loaded
with ``from_pretrained`` under the config (partitioned as it loads, ``zero.Init``). Skipped where deepspeed is not
installed.

DeepSpeed compiles a small C++ extension at its first communication set-up (~80 s on 2 cores); set
``TORCH_EXTENSIONS_DIR`` to a kept folder to compile it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME  # noqa: E402
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space  # noqa: E402
from uti_peft.training import train  # noqa: E402

from conftest import TEXT_VOCAB, probe_ids  # noqa: E402
from test_evaluation import write_jsonl  # noqa: E402
from test_training import REPO, examples, free_port, parse  # noqa: E402,F401

CONFIGS = {mode: os.path.join(REPO, "scripts", "deepspeed", f"{mode}.json") for mode in ("zero2", "zero3")}
MODES = {"zero2": "zero2", "zero3": "zero3", "zero3_init": "zero3"}  # mode -> config
ZERO_INIT = "Detected DeepSpeed ZeRO-3: activating zero.init()"  # transformers' from_pretrained, at info level
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO,
           "TRANSFORMERS_VERBOSITY": "info"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, reference):
    """The 2-process run of each mode, once (batch 1 per process, a checkpoint after step 1); ``zero3_init`` loads
    the tiny base from a directory (``from_pretrained``) instead of building it."""
    runs = {}

    def get(mode):
        if mode not in runs:
            directory = tmp_path_factory.mktemp(mode)
            out, ranks = directory / "out", directory / "ranks"
            base = []
            if mode == "zero3_init":
                build_tiny_qwen3().save_pretrained(directory / "base")
                tiny_token_space().save(directory / "base" / "token_space.json")
                base = ["--base", directory / "base"]
            args = [*reference[0], *base, "--deepspeed", CONFIGS[MODES[mode]], "--output-dir", out, "--batch-size",
                    "1", "--save-steps", "1", "--rank-state-dir", ranks]
            if base:
                args.remove("--tiny")
            proc = torchrun(args)
            assert proc.returncode == 0, proc.stderr[-4000:]
            # zero.Init partitioned the base as it loaded where (only where) it was loaded under the ZeRO-3 config
            assert (ZERO_INIT in proc.stderr) == (mode == "zero3_init")
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


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_deepspeed_processes_match_one(reference, launched, mode):
    _, single = reference
    out, rank_dir = launched(mode)
    (meta0, rank0), (meta1, rank1) = rank_states(rank_dir)
    assert [m["distributed_type"] for m in (meta0, meta1)] == ["DEEPSPEED", "DEEPSPEED"]
    assert [m["world_size"] for m in (meta0, meta1)] == ["2", "2"] and meta0["global_step"] == "2"
    full16 = {k[len("full16.") :]: v for k, v in rank0.items() if k.startswith("full16.")}  # rank 0 only
    assert sorted(rank0) == sorted([*rank1, *(f"full16.{k}" for k in full16)])
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank1)
    partitioned = meta0["partitioned_parameters"].split(",")
    assert (HEAD in partitioned and INPUT in partitioned) == MODES[mode].startswith("zero3")

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

    # ZeRO-3's full 16-bit save (stage3_gather_16bit_weights_on_model_save): the trained rows, also in the head's tail
    assert bool(full16) == MODES[mode].startswith("zero3")
    if full16:
        head_weight = full16["base_model.model.lm_head.base_layer.weight"]
        assert torch.equal(full16[HEAD], rank0[HEAD]) and torch.equal(full16[INPUT], rank0[INPUT])
        assert torch.equal(head_weight[TEXT_VOCAB:], rank0[HEAD])
        assert torch.equal(head_weight[:TEXT_VOCAB], fresh.lm_head.weight[:TEXT_VOCAB])
        embedding = full16["base_model.model.model.embed_tokens.base_layer.weight"]
        assert torch.equal(embedding, fresh.model.embed_tokens.weight)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_resume_from_a_deepspeed_checkpoint_continues_exactly(tmp_path, reference, launched, mode):
    """Step 1's DeepSpeed checkpoint resumed for step 2 ends bit-identical to the straight run; the resumed run starts
    from other rows (random ones, ``--init-rows mean_noise``), so only the checkpoint can make it match."""
    out, _ = launched(mode)
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / WEIGHTS_NAME).is_file() and any(p.name.startswith("global_step") for p in checkpoint.iterdir())
    common = [*reference[0], "--init-rows", "mean_noise"]
    proc = torchrun([*common, "--deepspeed", CONFIGS[MODES[mode]], "--output-dir", tmp_path / "resumed",
                     "--batch-size", "1", "--save-steps", "0", "--resume-from-checkpoint", checkpoint])
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight, resumed = load_file(out / WEIGHTS_NAME), load_file(tmp_path / "resumed" / WEIGHTS_NAME)
    assert sorted(straight) == sorted(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["global_step"] == 2


def test_the_train_command_ends_its_process_group(tmp_path, reference):
    """``uti-peft train`` destroys the process group it trained in before returning: a process that exits with a gloo
    group alive can abort during interpreter finalisation ("terminate called without an active exception", seen on
    one of two DeepSpeed ranks). One process with a launcher's environment, the CLI called in a fresh interpreter."""
    script = (
        "import sys, torch.distributed as dist\n"
        "from uti_peft.cli import main\n"
        "rc = main(['train', *sys.argv[1:]])\n"
        "print('process group after train:', dist.is_initialized())\n"
        "sys.exit(rc)\n"
    )
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env = {**os.environ, **launcher, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    args = [*reference[0], "--max-steps", "1", "--deepspeed", CONFIGS["zero2"], "--output-dir", tmp_path / "out",
            "--batch-size", "1", "--save-steps", "0"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "process group after train: False" in proc.stdout, proc.stdout[-2000:]


@contextmanager
def zero3_config():
    """A ZeRO-3 config in effect in this process (what ``TrainingArguments(deepspeed=...)`` sets up), nothing
    partitioned: the layers record their partitioned mode; ``deepspeed.initialize`` would partition later."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(json.loads(open(CONFIGS["zero3"]).read()))  # noqa: F841  # (in effect while alive)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _adapted(**config):
    import uti_peft
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=tiny_token_space(), **config))


def test_zero3_mode_computes_and_trains_as_the_plain_one():
    """The partitioned mode's forward is the plain mode's full-width product, bit for bit, with the same row
    gradients; rows changed without `sync_tail` are still what the forward uses, and `sync_tail` writes the tail."""
    with zero3_config():
        partitioned = _adapted()
    plain = _adapted()
    head, plain_head = partitioned.base_model.model.lm_head, plain.base_model.model.lm_head
    assert head.partitioned and not plain_head.partitioned
    assert not head.rows_share_base_storage("default") and plain_head.rows_share_base_storage("default")
    ids = probe_ids(tiny_token_space())
    for model in (partitioned, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, param in plain.named_parameters():
        if param.requires_grad:
            assert torch.equal(dict(partitioned.named_parameters())[name].grad, param.grad), name
    with torch.no_grad():
        for model in (partitioned, plain):
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.01)
        assert not torch.equal(head.base_layer.weight[TEXT_VOCAB:], head.rows("default"))  # a stale tail
        assert torch.equal(partitioned(input_ids=ids).logits, plain(input_ids=ids).logits)
        head.sync_tail()
        assert torch.equal(head.base_layer.weight[TEXT_VOCAB:], head.rows("default"))
        assert torch.equal(head.base_layer.weight[:TEXT_VOCAB], build_tiny_qwen3().lm_head.weight[:TEXT_VOCAB])
        assert torch.equal(partitioned(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_zero3_mode_refuses_what_it_cannot_do():
    import uti_peft
    from peft import get_peft_model

    from uti_peft.errors import RowExtensionError

    with zero3_config():
        with pytest.raises(RowExtensionError, match="ZeRO-3 with tied input/output embeddings"):
            get_peft_model(build_tiny_qwen3(tied=True), uti_peft.RowExtensionConfig(token_space=tiny_token_space()))
        model = _adapted()
        with pytest.raises(RowExtensionError, match="a layer holds one row-extension adapter"):
            model.add_adapter("second", uti_peft.RowExtensionConfig(token_space=tiny_token_space()))
    with pytest.raises(RowExtensionError, match="disabling a row-extension adapter is not supported"):
        with model.disable_adapter():
            pass
    with pytest.raises(RowExtensionError, match="merging a row-extension adapter is not supported"):
        model.merge_and_unload()
