"""uti_peft.training (``uti-peft train`` / scripts/train.py) on the tiny Qwen3: what is trained, what is not,
per-kind learning rates, per-task logs, bf16 + checkpointing + accumulation, resuming, and data-parallel
training under ``accelerate launch`` (2 CPU processes, gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from uti_peft.cli import build_parser
from uti_peft.cli import main as cli_main
from uti_peft.data import PaddingCollator, prepare
from uti_peft.evaluation import evaluate
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.output_dir import MARKER_NAME, check_output_dir
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space
from uti_peft.training import build_model, load_base, parameter_groups, train

from conftest import TEXT_VOCAB
from test_evaluation import make_examples, write_jsonl

TS = tiny_token_space()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = ["--lora-r", "4", "--lora-dropout", "0"]


@pytest.fixture(scope="module")
def examples():
    return make_examples()  # 10 examples of 3 tasks, lengths 13..46, some with prompt-masked labels


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, examples)
    return path


def parse(*argv):
    return build_parser().parse_args(["train", *map(str, argv)])


def run(data_file, output_dir, *extra, tied=False):
    """Train in this process: tiny Qwen3, lr 1e-2, log every step, no periodic checkpoint unless asked."""
    args = parse("--tiny", "tied" if tied else "untied", "--data", data_file, "--output-dir", output_dir, "--cpu",
                 "--no-progress", "--learning-rate", "1e-2", "--logging-steps", "1", "--save-steps", "0", *extra)
    return train(args)


def trained_params(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def inner_optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it


def assert_base_untouched(model, tied):
    """Every base parameter equals the freshly built base's, bit for bit; embedding/head up to text_vocab_size."""
    fresh = dict(build_tiny_qwen3(tied=tied).named_parameters())
    current = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for name, p in model.named_parameters()
        if "row_extension_" not in name and "lora_" not in name
    }
    assert sorted(current) == sorted(fresh)
    embedding_names = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, original in fresh.items():
        if name in embedding_names:
            assert torch.equal(current[name][:TEXT_VOCAB], original[:TEXT_VOCAB]), name
        else:
            assert torch.equal(current[name], original), name


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("tied", [False, True])
def test_trains_only_the_new_rows_and_saves_them(data_file, tmp_path, examples, tied):
    args = parse("--tiny", "tied" if tied else "untied", "--data", data_file, "--output-dir", tmp_path / "out")
    initial = {n: p.detach().clone() for n, p in trained_params(build_model(load_base(args), args)).items()}
    trainer = run(data_file, tmp_path / "out", "--max-steps", "3", "--batch-size", "2", "--save-steps", "2", tied=tied)
    model = trainer.model

    rows = trained_params(model)
    expected = ["row_extension_input_rows"] if tied else ["row_extension_input_rows", "row_extension_output_rows"]
    assert [n.split(".")[-2] for n in rows] == expected  # one set of rows when tied
    assert all(not torch.equal(p, initial[n]) for n, p in rows.items())
    assert_base_untouched(model, tied)
    if tied:
        base = model.get_base_model()
        with torch.no_grad():  # (with gradients on, the head's .weight is a view that trains the rows)
            assert base.lm_head.weight is base.model.embed_tokens.weight

    # optimizer state for the rows only, shaped like them
    state = inner_optimizer(trainer).state
    assert {id(p) for p in state} == {id(p) for p in rows.values()}
    assert all(s["exp_avg"].shape == s["exp_avg_sq"].shape == (TS.num_new_rows, 64) for s in state.values())

    # periodic and final saves hold the rows only, and the final one reproduces the trained model
    final = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert sorted(final) == ([INPUT_ROWS_KEY] if tied else [INPUT_ROWS_KEY, OUTPUT_ROWS_KEY])
    assert sorted(load_file(tmp_path / "out" / "checkpoint-2" / WEIGHTS_NAME)) == sorted(final)
    ids = examples[0].input_ids
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(tied=tied), tmp_path / "out")
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


def test_per_task_loss_in_the_logs_equals_the_evaluation_numbers(data_file, tmp_path, examples):
    # lr 0 keeps the model fixed; 2 steps of 5 examples, logged together, see every example once
    trainer = run(data_file, tmp_path / "out", "--learning-rate", "0", "--max-steps", "2", "--batch-size", "5",
                  "--logging-steps", "2")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 1
    report = evaluate(trainer.model, TS, examples, progress=False)
    for task in ("a2t", "i2t", "t2i"):
        assert logs[0][f"loss/{task}"] == pytest.approx(report["loss_token_weighted"][task], rel=1e-5)
    saved = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert saved["log_history"][0]["loss/t2i"] == logs[0]["loss/t2i"]

    # the trainer's loss (computed once, from the same token losses) is the model's own causal-LM loss
    prepared = [prepare(e, TS, 2048, "left") for e in examples]
    batch = PaddingCollator(TS.pad_token_id)(prepared)
    with torch.no_grad():
        expected = trainer.model(**batch).loss
        ours = trainer.compute_loss(trainer.model, dict(batch))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_separate_learning_rates_per_kind_of_parameter(data_file, tmp_path):
    trainer = run(data_file, tmp_path / "out", *LORA, "--learning-rate", "1e-3", "--input-rows-lr", "1e-2",
                  "--head-rows-lr", "5e-3", "--lora-lr", "2e-4", "--lr-scheduler-type", "constant", "--max-steps", "1")
    groups = {g["name"]: g for g in inner_optimizer(trainer).param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"input_rows": 1e-2, "head_rows": 5e-3, "lora": 2e-4}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    markers = {"input_rows": "row_extension_input_rows", "head_rows": "row_extension_output_rows", "lora": ".lora_"}
    for name, group in groups.items():
        assert group["params"] and all(markers[name] in names[id(p)] for p in group["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(trained_params(trainer.model))
    # optimizer state: rows and LoRA only, each shaped like its parameter
    state = inner_optimizer(trainer).state
    assert {id(p) for p in state} == {id(p) for p in trained_params(trainer.model).values()}
    assert all(s["exp_avg"].shape == p.shape for p, s in state.items())
    assert_base_untouched(trainer.model, tied=False)


def test_parameter_groups_refuse_unknown_trainable_parameters():
    args = parse("--tiny", "--data", "unused", "--output-dir", "unused")
    model = build_model(load_base(args), args)
    model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        parameter_groups(model, {"input_rows": 1.0, "head_rows": 1.0, "lora": 1.0}, 0.0)


def final_weights(output_dir):
    return {f"{name}:{key}": value for name in (WEIGHTS_NAME, f"lora/{WEIGHTS_NAME}")
            for key, value in load_file(os.path.join(output_dir, name)).items()}


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_accumulation_equals_the_larger_batch(data_file, tmp_path):
    """2 micro-batches of 1 with accumulation (and activation checkpointing) == batches of 2, rows and LoRA, 3 steps."""
    common = [*LORA, "--max-steps", "3", "--lr-scheduler-type", "constant"]
    big = run(data_file, tmp_path / "big", *common, "--batch-size", "2")
    small = run(data_file, tmp_path / "small", *common, "--batch-size", "1", "--gradient-accumulation-steps", "2",
                "--gradient-checkpointing")
    assert small.model.get_base_model().is_activation_checkpointing
    assert [e["epoch"] for e in small.state.log_history if "loss" in e] == pytest.approx([0.2, 0.4, 0.6])
    one, two = final_weights(tmp_path / "big"), final_weights(tmp_path / "small")
    assert sorted(one) == sorted(two)
    for key in one:
        # The same token losses summed over the same 2 examples and divided by the same token count; only the
        # order of the sums differs (one padded [2, L] batch vs two unpadded ones), which changes the gradients in
        # their last float bits. As in the two-process test below, Adam turns that into visible differences on
        # entries whose gradient is near zero (its first steps are ~lr * sign(gradient): measured up to 2.5e-5
        # relative on the rows and 1.4e-4 on a LoRA B that starts at 0), hence 1e-3; a wrong normalisation (mean
        # of micro-batch means) or a lost micro-batch moves whole tensors by about lr = 1e-2, i.e. 1e-1 and more.
        assert relative_error(two[key], one[key]) < 1e-3, key
    # Before Adam: the gradient norm of each step and the loss agree to float rounding (measured ~1e-7).
    for field in ("loss", "grad_norm"):
        values = [[e[field] for e in t.state.log_history if "loss" in e] for t in (big, small)]
        assert values[0] == pytest.approx(values[1], rel=1e-5), field
    assert_base_untouched(small.model, tied=False)


# torch.finfo(torch.bfloat16).eps: bf16 keeps 8 significant bits, so every value autocast rounds (GEMM inputs and
# outputs) carries a relative error of at most eps / 2.
BF16_EPS = 2.0**-7


def test_bf16_autocast_losses_within_bf16_rounding_of_float32(data_file, tmp_path):
    """The first step's per-task losses (same weights, one forward) under bf16 autocast vs float32.

    Bound: each logit comes out of a bf16 GEMM whose inputs and output are rounded to bf16 (relative error
    <= eps/2 each, with float32 accumulation); the loss is logsumexp(logits) - logit(label), averaged over
    tokens, and the hidden states feeding the head went through 2 decoder layers of such GEMMs. A relative
    loss error of 2 eps (4 roundings compounding in the same direction) bounds this on AVX2 and on
    AVX512-BF16 CPUs alike, whatever their GEMMs' accumulation order (measured on a 2-core AVX2 EPYC: 3.5e-6 to
    9.0e-6, about 0.001 eps: the roundings mostly cancel over the tokens). An autocast that did not run gives
    exactly 0 and fails; so does anything that changes the numbers beyond bf16 rounding (a wrong scaling, a lost
    micro-batch, a dtype mix-up in the head). Last-bit effects within bf16 rounding are what it cannot judge.
    """
    common = [*LORA, "--max-steps", "1", "--batch-size", "5", "--gradient-checkpointing"]
    bf16 = run(data_file, tmp_path / "bf16", *common, "--bf16")
    assert bf16.accelerator.mixed_precision == "bf16"  # (accelerate's state is per process: check it now)
    assert_base_untouched(bf16.model, tied=False)
    fp32 = run(data_file, tmp_path / "fp32", *common)
    assert fp32.accelerator.mixed_precision == "no"
    first = [next(e for e in t.state.log_history if "loss" in e) for t in (bf16, fp32)]
    tasks = [k for k in first[1] if k.startswith("loss/")]
    assert len(tasks) == 3
    differences = [abs(first[0][k] - first[1][k]) / first[1][k] for k in tasks]
    assert 0 < max(differences) <= 2 * BF16_EPS, differences
    assert bf16.state.global_step == 1 and math.isfinite(bf16.state.log_history[-1]["train_loss"])


def test_resume_from_checkpoint_continues_exactly(data_file, tmp_path):
    """4 straight steps == 2 steps, then resumed for 2. The resumed run starts from other rows (``--init-rows
    mean``), so it can only match by loading the checkpoint; and a restart from the checkpoint's weights without
    its optimizer, scheduler and data position differs, so the match shows that those were restored too."""
    common = [*LORA, "--max-steps", "4", "--batch-size", "3", "--lr-scheduler-type", "linear"]
    straight_run = run(data_file, tmp_path / "straight", *common, "--save-steps", "2")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resumed = run(data_file, tmp_path / "resumed", *common, "--init-rows", "mean", "--resume-from-checkpoint",
                  checkpoint)
    assert resumed.state.global_step == 4
    logs = [[e for e in t.state.log_history if "loss" in e] for t in (straight_run, resumed)]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4]  # the checkpoint's history, then steps 3 and 4
    assert logs[1] == logs[0]
    straight, continued = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert sorted(straight) == sorted(continued)
    for key in straight:
        assert torch.equal(straight[key], continued[key]), key

    # The control: the checkpoint's weights, but a fresh optimizer, schedule and data order, for 2 steps.
    run(data_file, tmp_path / "restarted", *LORA, "--max-steps", "2", "--batch-size", "3",
        "--init-adapter", checkpoint)
    restarted = final_weights(tmp_path / "restarted")
    differences = {key: relative_error(restarted[key], straight[key]) for key in straight}
    assert min(differences.values()) > 1e-3, differences  # every tensor moves: the state does matter


def test_init_adapter_starts_from_saved_rows_and_lora(data_file, tmp_path):
    run(data_file, tmp_path / "first", *LORA, "--max-steps", "2", "--batch-size", "2")
    # lr 0: the second run's adapter must be the first one, loaded trainable (optimizer state for all of it)
    trainer = run(data_file, tmp_path / "second", "--init-adapter", tmp_path / "first", *LORA,
                  "--learning-rate", "0", "--max-steps", "1")
    params = trained_params(trainer.model)
    assert sum("lora_" in n for n in params) == 2 * 7 * 2  # one LoRA (A and B, 7 targets, 2 layers), not two
    assert {id(p) for p in inner_optimizer(trainer).state} == {id(p) for p in params.values()}
    for name in (WEIGHTS_NAME, f"lora/{WEIGHTS_NAME}"):
        first, second = load_file(tmp_path / "first" / name), load_file(tmp_path / "second" / name)
        assert all(torch.equal(first[k], second[k]) for k in first) and sorted(first) == sorted(second)


def test_base_directory_and_token_space_checks(data_file, tmp_path):
    base = tmp_path / "base"
    build_tiny_qwen3().save_pretrained(base)
    args = parse("--base", base, "--data", data_file, "--output-dir", tmp_path / "out", "--cpu", "--max-steps", "1",
                 "--no-progress", "--save-steps", "0")
    with pytest.raises(FileNotFoundError, match="--token-space"):
        train(args)
    TS.save(base / "token_space.json")
    assert train(args).state.global_step == 1
    other = tmp_path / "other_space.json"
    other.write_text(json.dumps({**TS.to_dict(), "version": "another"}))
    with pytest.raises(ValueError, match="differs from the token space of --init-adapter"):
        train(parse("--base", base, "--data", data_file, "--output-dir", tmp_path / "again", "--init-adapter",
                    tmp_path / "out", "--token-space", other))


# ---------------------------------------------------------------------------------------- several processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    # DDP: accelerate's multi-GPU launcher (torchrun); the script's --cpu makes it gloo on CPU processes
    "ddp": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    # FSDP2: the config users run (scripts/accelerate/fsdp2.yaml), exactly as documented
    "fsdp2": ["--config_file", os.path.join(REPO, "scripts", "accelerate", "fsdp2.yaml")],
}


@pytest.fixture(scope="module")
def global_batch(tmp_path_factory, examples):
    """The data set is the global batch (2 examples of different lengths and tasks), so every step sees it all
    whatever the order; fp32 and LoRA dropout 0 make the runs comparable to float tolerance. Returns the data
    file, the options every run shares and the single-process reference (batch 2)."""
    directory = tmp_path_factory.mktemp("global_batch")
    data = directory / "two.jsonl"
    write_jsonl(data, [examples[0], examples[1]])
    common = ["--tiny", "--data", str(data), "--cpu", "--no-progress", "--learning-rate", "1e-2", "--logging-steps",
              "1", "--max-steps", "3", *LORA]
    single = train(parse(*common, "--output-dir", directory / "single", "--batch-size", "2", "--save-steps", "0"))
    params = {name: p.detach().clone() for name, p in trained_params(single.model).items()}
    logs = [e for e in single.state.log_history if "loss" in e]
    return common, params, logs


def launch(mode, args, timeout=300):
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[mode], "--num_processes", "2",
               "--main_process_port", str(free_port()), os.path.join(REPO, "scripts", "train.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, global_batch):
    """The 2-process runs, once per mode (FSDP2's is resumed by another test): output and rank-state directories."""
    common = global_batch[0]
    runs = {}

    def get(mode):
        if mode not in runs:
            directory = tmp_path_factory.mktemp(mode)
            out, ranks = directory / "out", directory / "ranks"
            proc = launch(mode, [*common, "--output-dir", out, "--batch-size", "1", "--save-steps", "2",
                                 "--rank-state-dir", ranks])
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[mode] = out, ranks
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, examples, global_batch, launched, mode):
    """2 processes x batch 1 under ``accelerate launch`` (DDP, or FSDP2 with the shipped config; gloo on CPU)
    == 1 process x batch 2, rows and LoRA, 3 steps."""
    common, single_params, single_logs = global_batch
    out, rank_dir = launched(mode)

    ranks = []
    for rank in (0, 1):
        path = rank_dir / f"rank{rank}.safetensors"
        with safe_open(str(path), "pt") as f:
            ranks.append((f.metadata(), load_file(path)))
    (meta0, rank0), (meta1, rank1) = ranks
    assert [m["world_size"] for m, _ in ranks] == ["2", "2"] and [m["global_step"] for m, _ in ranks] == ["3", "3"]
    assert [m["should_save"] for m, _ in ranks] == ["True", "False"]  # only rank 0 writes the adapter
    assert {m["distributed_type"] for m, _ in ranks} == {"FSDP" if mode == "fsdp2" else "MULTI_CPU"}
    if mode == "fsdp2":
        # decoder layers (base weights and LoRA) sharded; the embedding and lm_head, which hold the rows, whole
        sharded = meta0["sharded_parameters"].split(",")
        assert any(".layers.0.self_attn.q_proj.base_layer.weight" in n for n in sharded)
        assert any(".layers.1.mlp.down_proj.lora_B.lora.weight" in n for n in sharded)
        assert not any("embed_tokens" in n or "lm_head" in n for n in sharded)
    # on each process, the rows parameter is still the very tail of the weight the lm_head's forward uses
    for meta, state in ranks:
        assert meta["rows_attached"] == "True"
        tails = [k for k in state if k.startswith("tail.")]
        assert len(tails) == 1 and torch.equal(state[tails[0]], state[tails[0].removeprefix("tail.")])
    assert sorted(rank0) == sorted(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    assert sorted(single_params) == sorted(k for k in rank0 if k != "logits" and not k.startswith(("tail.", "weight.")))
    for name, param in single_params.items():
        # The all-reduced (DDP) or reduce-scattered (FSDP) mean gradient differs from the one-batch gradient in the
        # last float bits (the order of the sums differs, and with it the CPU's kernels: AVX2 and AVX512 machines
        # round differently). Adam turns that into a visible difference on the few entries whose gradient is near
        # zero (a new row hit once, LoRA A while B is still ~0): measured up to 8e-6 on rows of ~0.02 and 3e-5 on
        # LoRA entries of ~0.1. A wrong reduction or a missed step moves whole tensors by ~lr = 1e-2, 100x this.
        error = (rank0[name] - param).norm() / param.norm()
        assert error < 1e-4, (name, error.item())

    # the adapter rank 0 saved holds the rows only (and the LoRA beside them) and reloads to the trained logits
    saved = load_file(out / WEIGHTS_NAME)
    assert sorted(saved) == [INPUT_ROWS_KEY, OUTPUT_ROWS_KEY]
    assert torch.equal(saved[OUTPUT_ROWS_KEY], rank0["base_model.model.lm_head.row_extension_output_rows.default"])
    assert torch.equal(saved[INPUT_ROWS_KEY], rank0["base_model.model.model.embed_tokens.row_extension_input_rows.default"])
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(), out)
    assert torch.equal(logits_of(loaded, examples[0].input_ids), rank0["logits"])

    # per-task losses, summed over the two processes, are the single process's
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    tasks = sorted({examples[0].task, examples[1].task})
    assert len(logs) == len(single_logs) == 3
    for several, one in zip(logs, single_logs):
        for task in tasks:
            assert several[f"loss/{task}"] == pytest.approx(one[f"loss/{task}"], rel=1e-5)


# ---------------------------------------------------------------------------------------- output directory
def cli_train(data_file, output_dir, *extra, base=None):
    """``uti-peft train`` through the command line (exit code, stderr); ``base`` a path that must not be loaded."""
    source = ["--base", str(base)] if base else ["--tiny"]
    return cli_main(["train", *source, "--data", str(data_file), "--output-dir", str(output_dir), "--cpu",
                     "--no-progress", "--max-steps", "1", "--save-steps", "0", *map(str, extra)])


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["foreign", "legacy", "adapter", "own"])
def test_non_empty_output_dirs_are_refused_before_loading_anything(data_file, tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "own":
        assert cli_train(data_file, out) == 0
    else:
        out.mkdir()
        name = {"foreign": "README.md", "legacy": "trainable_rows.pt", "adapter": "adapter_config.json"}[kind]
        (out / name).write_text("precious")
    before = snapshot(out)
    capsys.readouterr()
    # a base that does not exist: were it loaded before the check, the error would be another one
    assert cli_train(data_file, out, base=tmp_path / "no-such-base") == 2
    error = capsys.readouterr().err
    assert error.startswith("uti-peft train: error: ") and error.count("\n") == 1 and str(out) in error
    expected = {"foreign": "README.md", "legacy": "legacy checkpoint", "adapter": "adapter directory",
                "own": "an earlier uti-peft train run"}[kind]
    assert expected in error
    assert snapshot(out) == before  # nothing changed

    # the refusal's own advice works: it names --overwrite-output-dir only for a run of ours
    assert ("--overwrite-output-dir to replace it" in error) is (kind == "own")

    # --overwrite-output-dir replaces only an earlier run: never a user's files, a legacy checkpoint or an adapter
    code = cli_train(data_file, out, "--overwrite-output-dir", base=tmp_path / "no-such-base")
    error = capsys.readouterr().err
    if kind != "own":
        assert code == 2 and str(out) in error and "choose another directory" in error
    else:  # allowed: the check passes and the (missing) base is what fails next, leaving the directory as it was
        assert code == 2 and "no-such-base" in error
    assert snapshot(out) == before


def test_overwrite_and_resume_of_our_own_runs(data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_train(data_file, out, "--save-steps", "1") == 0
    assert (out / MARKER_NAME).is_file() and (out / "checkpoint-1").is_dir()
    first = load_file(out / WEIGHTS_NAME)
    # not from a checkpoint the overwrite would clear
    capsys.readouterr()
    assert cli_train(data_file, out, "--overwrite-output-dir", "--init-adapter", out / "checkpoint-1") == 2
    assert "is a checkpoint of the run --overwrite-output-dir" in capsys.readouterr().err
    # overwriting our own run replaces its adapter and clears its checkpoints (a later "latest" must not find them)
    assert cli_train(data_file, out, "--overwrite-output-dir", "--learning-rate", "1e-2") == 0
    assert not (out / "checkpoint-1").exists()
    assert not torch.equal(load_file(out / WEIGHTS_NAME)[INPUT_ROWS_KEY], first[INPUT_ROWS_KEY])
    # resuming "latest" needs a checkpoint of ours
    capsys.readouterr()
    assert cli_train(data_file, out, "--resume-from-checkpoint", "latest") == 2
    assert "no checkpoint-<step> directory in" in capsys.readouterr().err
    # a run of 2 steps, checkpointed at each; resumed from its first checkpoint (the second removed), starting from
    # other rows (--init-rows mean), it must end bit for bit where it ended: only the checkpoint's rows, optimizer
    # and data position can make it so (a run that ignored the resume would also reach step 2)
    assert cli_train(data_file, out, "--save-steps", "1", "--max-steps", "2", "--overwrite-output-dir") == 0
    expected = load_file(out / WEIGHTS_NAME)
    shutil.rmtree(out / "checkpoint-2")
    assert cli_train(data_file, out, "--resume-from-checkpoint", "latest", "--max-steps", "2", "--init-rows",
                     "mean") == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    resumed = load_file(out / WEIGHTS_NAME)
    assert sorted(resumed) == sorted(expected) and all(torch.equal(resumed[k], expected[k]) for k in expected)

    # only our own runs are resumed: not "latest" in a foreign directory, not a checkpoint we did not write
    foreign = tmp_path / "foreign"  # a checkpoint copied out of our run, into a directory without our marker
    shutil.copytree(out / "checkpoint-1", foreign / "checkpoint-1")
    before = snapshot(foreign)
    for resume, target, message in [
        ("latest", foreign, "is not a uti-peft train run"),
        (foreign / "checkpoint-1", tmp_path / "new", "was not written by a uti-peft train run"),
        (out / "checkpoint-1", foreign, "not empty and not a uti-peft train run"),
    ]:
        capsys.readouterr()
        assert cli_train(data_file, target, "--resume-from-checkpoint", resume, base=tmp_path / "no-such-base") == 2
        assert message in capsys.readouterr().err
    assert snapshot(foreign) == before and not (tmp_path / "new").exists()


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t2i", "input_ids": [999999]}\n')  # an id outside the token space
    out = tmp_path / "new" / "out"
    assert cli_train(bad, out) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a failure once the Trainer has made the directory (os.makedirs in Trainer.__init__) removes what it made,
    # and nothing that was there before
    plan = check_output_dir(str(out), overwrite=False, resume=None)
    os.makedirs(out)
    plan.abandon()
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    plan = check_output_dir(str(tmp_path / "empty"), overwrite=False, resume=None)
    plan.claim(is_main_process=True)
    plan.abandon()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_USE_DEEPSPEED", "true", "start the processes with torchrun and give the DeepSpeed config"),
    ("FSDP_VERSION", "1", "FSDP version 1"),
])
def test_unsupported_launch_setups_are_refused_at_start(data_file, tmp_path, capsys, monkeypatch, variable, value,
                                                        message):
    # what `accelerate launch` exports for a DeepSpeed config, or for an FSDP config with fsdp_version: 1
    monkeypatch.setenv(variable, value)
    if variable == "FSDP_VERSION":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    # every path is fine (the paths are checked first, before torch is imported): the launch set-up is what fails,
    # before the model is built or the output directory made
    assert cli_train(data_file, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_deepspeed_without_a_launcher_or_config_is_refused_at_start(data_file, tmp_path, capsys, monkeypatch):
    """Outside torchrun DeepSpeed would look for MPI to find its peers; a missing config is a path error."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = os.path.join(REPO, "scripts", "deepspeed", "zero2.json")
    for given, message in ((tmp_path / "none.json", "--deepspeed"), (config, "start the command with torchrun")):
        assert cli_train(data_file, tmp_path / "out", "--deepspeed", given) == 2
        err = capsys.readouterr().err
        assert err.startswith("uti-peft train: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


def test_resume_under_fsdp2_continues_exactly(tmp_path, global_batch, launched):
    """An FSDP2 checkpoint (accelerate's FSDP model and optimizer files, plus the adapter) resumes to the straight
    run bit for bit; the resumed run starts from other rows (``--init-rows mean``), so only the checkpoint can make
    it match."""
    common = global_batch[0]
    straight_dir, _ = launched("fsdp2")
    checkpoint = straight_dir / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / WEIGHTS_NAME).is_file()
    proc = launch("fsdp2", [*common, "--output-dir", tmp_path / "resumed", "--batch-size", "1", "--save-steps", "0",
                            "--init-rows", "mean", "--resume-from-checkpoint", checkpoint])
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight, resumed = final_weights(straight_dir), final_weights(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["global_step"] == 3


def test_the_run_carries_the_base_tokenizer_extended_and_a_base_without_one_is_named(data_file, tmp_path, caplog):
    run(data_file, tmp_path / "tiny", "--max-steps", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")  # what pipeline(model=OUTPUT_DIR) reads
    assert len(tokenizer) == TS.vocab_size and tokenizer.pad_token_id == TS.pad_token_id

    base = tmp_path / "base"  # a saved base with no tokenizer files: trained all the same, said once
    build_tiny_qwen3().save_pretrained(base)
    TS.save(base / "token_space.json")
    args = parse("--base", base, "--data", data_file, "--output-dir", tmp_path / "plain", "--cpu", "--no-progress",
                 "--max-steps", "1", "--save-steps", "0")
    with caplog.at_level("WARNING"):
        train(args)
    assert f"base {str(base)!r} has no tokenizer files; {tmp_path / 'plain'} will hold no tokenizer" in caplog.text
    assert not (tmp_path / "plain" / "tokenizer_config.json").exists()
    assert (tmp_path / "plain" / WEIGHTS_NAME).is_file()
