"""The options of every ``uti-peft`` command, and what each command runs and prints.

Defining the options imports nothing heavy (the names and defaults come from `uti_peft.constants`); each
``run_*`` function imports its task module when the command runs, checks what can be checked cheaply
(paths, ids, file formats: `uti_peft.cli.checks`) before loading any model, and prints the outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from ..constants import (
    DEFAULT_COMMIT_MESSAGE,
    DEFAULT_MAX_SEQ_LEN,
    DTYPE_NAMES,
    HEAD_ROW_MODES,
    INIT_STRATEGIES,
    LEGACY_JSON_NAME,
    LEGACY_PT_NAME,
    LORA_TARGETS,
    TOKEN_SPACE_NAME,
    TRUNCATION_SIDES,
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    define: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: Optional[str] = None


# ---------------------------------------------------------------------------------------- argparse types
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def names(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated names."""
    found = tuple(n.strip() for n in text.split(",") if n.strip())
    if not found:
        raise argparse.ArgumentTypeError("expected comma-separated module names")
    return found


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--max-seq-len`` and ``--truncation-side``, the same for every command that reads data."""
    parser.add_argument("--data", required=True, help="tokenized JSONL (task, input_ids, optional labels)")
    parser.add_argument("--max-seq-len", type=positive_int, default=DEFAULT_MAX_SEQ_LEN,
                        help="longer examples are truncated")
    parser.add_argument(
        "--truncation-side", choices=TRUNCATION_SIDES, default="left", help="left keeps the end of a long example"
    )


# ---------------------------------------------------------------------------------------- demo
def define_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="keep the tiny base (WORKDIR/base) and the adapter (WORKDIR/adapter) here "
                        "(default: a temp dir, removed at the end)")
    parser.add_argument("--steps", type=non_negative_int, default=3, help="training steps on random tokens (0: none)")


def run_demo(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        from ..output_dir import demo_workdir_targets

        demo_workdir_targets(args.workdir)  # before torch is imported
    from ..demo import run_demo as demo

    report = demo(args.workdir, steps=args.steps)
    print("uti-peft demo: tiny Qwen3 + a token space shaped like the real one (no download)")
    for key, value in report.items():
        print(f"  {key:26s} {value}")
    if args.steps == 0:
        print("note: --steps 0: nothing was trained; the new rows keep their initial values (mean of the text rows "
              "plus noise), and saving, loading and merging were checked with them")
    ok = report["loaded_equals_trained"] and report["merged_equals_loaded"]
    print("OK: save -> PeftModel.from_pretrained -> merge reproduces the logits exactly" if ok else "FAILED")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------- legacy
def define_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help=f"directory holding {LEGACY_PT_NAME}")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT_DIR", help="adapter directory to create")
    parser.add_argument("--token-space", metavar="PATH", help=f"token space JSON (default: {TOKEN_SPACE_NAME} in "
                        "the checkpoint)")
    parser.add_argument("--base-model", metavar="ID", help="base model id for the adapter (default: the "
                        "checkpoint's base_llm)")
    parser.add_argument("--dtype", choices=["keep", *DTYPE_NAMES], default="keep", help="dtype of the stored rows")
    parser.add_argument("--eval-report", metavar="PATH", help="eval JSON (loss_mean, counts) for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output directory")
    parser.add_argument("--allow-nonfinite", action="store_true", help="convert rows holding NaN/Inf")
    parser.add_argument("--lora", metavar="LORA_DIR", help="Stage-4 PEFT LoRA directory trained on the resized "
                        "model: stored as lora/")


def run_convert(args: argparse.Namespace) -> int:
    from .checks import existing_dir, existing_file, existing_path

    existing_path(args.checkpoint_dir, "CHECKPOINT_DIR", f"a legacy checkpoint directory or its {LEGACY_PT_NAME}")
    existing_file(args.token_space, "--token-space")
    existing_file(args.eval_report, "--eval-report")
    existing_dir(args.lora, "--lora", "a PEFT LoRA directory")
    from ..legacy import convert_legacy, inspect_checkpoint

    out = convert_legacy(
        args.checkpoint_dir, args.output, token_space=args.token_space, base_model=args.base_model,
        dtype=args.dtype, eval_report=args.eval_report, overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite, lora_dir=args.lora,
    )
    info = inspect_checkpoint(out)
    print(f"wrote {out}: {info['new_rows']} new rows x {info['hidden_size']} ({info['dtype']}), "
          f"ids {info['row_range']}, base {info['base_model']}")
    if not info["lm_head_rows"]:
        print("note: the checkpoint has no lm_head rows, so neither has the adapter: on a tied base the head shares "
              "the input rows; on an untied base the head's new rows are set to the mean of its text rows (with a "
              "warning when loading)")
    return 0


def define_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="row-extension adapter directory")
    parser.add_argument("-o", "--output", required=True, metavar="CHECKPOINT_DIR", help="legacy directory to create")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export-legacy output (never an original checkpoint)")


def run_export(args: argparse.Namespace) -> int:
    from .checks import existing_dir

    existing_dir(args.adapter_dir, "ADAPTER_DIR", "a row-extension adapter directory")
    from ..legacy import export_legacy

    out = export_legacy(args.adapter_dir, args.output, overwrite=args.overwrite)
    print(f"wrote {out}: {LEGACY_PT_NAME}, {LEGACY_JSON_NAME}, {TOKEN_SPACE_NAME}")
    return 0


def define_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="legacy checkpoint directory / .pt, or adapter directory")
    parser.add_argument("--token-space", metavar="PATH", help="token space for a legacy checkpoint without one")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_inspect(args: argparse.Namespace) -> int:
    from .checks import existing_file, existing_path

    existing_path(args.path, "PATH", "a legacy checkpoint (directory or .pt) or an adapter directory")
    existing_file(args.token_space, "--token-space")
    from ..legacy import inspect_checkpoint

    info = inspect_checkpoint(args.path, token_space=args.token_space)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "problems":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:20s} {value}")
    for problem in info["problems"]:
        print(f"problem: {problem}")
    return 0


# ---------------------------------------------------------------------------------------- push
def define_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory written by save_pretrained")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target repo, e.g. org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="commit message")


def run_push(args: argparse.Namespace) -> int:
    from ..paths import hub_repo_id

    hub_repo_id(args.repo_id, "REPO_ID")
    from .checks import existing_dir

    existing_dir(args.adapter_dir, "ADAPTER_DIR", "a directory written by save_pretrained")
    from ..adapter_folder import check_adapter_folder
    from ..hub import push_adapter, use_request_timeout

    folder = check_adapter_folder(args.adapter_dir)  # before any request
    use_request_timeout()
    info = push_adapter(folder.path, args.repo_id, private=True if args.private else None, revision=args.revision,
                        commit_message=args.commit_message)
    target = info.repo_url.repo_id if info.repo_url else args.repo_id
    print(f"pushed {', '.join(folder.files)} to {target}{'@' + args.revision if args.revision else ''}: "
          f"{info.commit_url}")
    return 0


# ---------------------------------------------------------------------------------------- merge
def define_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model directory or Hub id (safetensors)")
    parser.add_argument("adapter", metavar="ADAPTER", help="row-extension adapter directory or Hub id")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of every floating tensor (default: the base's)")
    parser.add_argument("--tokenizer", metavar="DIR_OR_ID", help="text tokenizer (default: the base's own)")
    parser.add_argument("--max-shard-size", help="largest shard, e.g. 5GB (default: transformers' own default)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier merge output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_merge(args: argparse.Namespace) -> int:
    from ..paths import model_source
    from .checks import bound_hub_requests

    model_source(args.base, "BASE")  # a local-looking path that does not exist fails before torch is imported
    model_source(args.adapter, "ADAPTER")
    if args.tokenizer:
        model_source(args.tokenizer, "--tokenizer")
    bound_hub_requests()
    from ..merge import merge_adapter  # checks BASE and ADAPTER (local paths never go to the Hub) before reading

    out = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        progress=False if args.no_progress else None)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0


# ---------------------------------------------------------------------------------------- extract
def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def define_extract(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the base model SOURCE extends: directory or Hub id (safetensors)")
    parser.add_argument("source", metavar="SOURCE", help="a resized checkpoint (directory or Hub id, safetensors), a "
                        "PEFT LoRA adapter with saved embedding layers, or a PEFT trainable-tokens adapter")
    parser.add_argument("-o", "--output", required=True, metavar="ADAPTER", help="adapter directory to create")
    parser.add_argument("--token-space", metavar="PATH", help=f"token space JSON (default: {TOKEN_SPACE_NAME} beside "
                        "SOURCE, else inferred from the tokens SOURCE's tokenizer adds to BASE's)")
    parser.add_argument("--max-text-drift", type=non_negative_float, default=0.0, metavar="X",
                        help="accept text rows that differ from BASE's by at most X (the adapter keeps BASE's)")
    parser.add_argument("--base-model", metavar="ID", help="base id recorded in the adapter (default: BASE)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier adapter directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_extract(args: argparse.Namespace) -> int:
    from .checks import check_extract

    check_extract(args)  # paths and ids before anything is read
    from ..extract import extract_adapter

    plan = extract_adapter(args.base, args.source, args.output, token_space=args.token_space,
                           max_text_drift=args.max_text_drift, base_model=args.base_model, overwrite=args.overwrite,
                           progress=False if args.no_progress else None)
    blocks = "input and lm_head rows" if len(plan.rows) == 2 else "input rows"
    print(f"wrote {args.output}: {plan.space.num_new_rows} new {blocks} (ids {plan.space.text_vocab_size}.."
          f"{plan.space.vocab_size - 1}) from a {plan.kind}{' + its LoRA (lora/)' if plan.lora else ''}")
    if plan.text_drift:
        print(f"note: SOURCE's text rows differ from BASE's by up to {plan.text_drift:.6g}; the adapter uses BASE's")
    for note in plan.notes:
        print(f"note: {note}")
    return 0


# ---------------------------------------------------------------------------------------- eval
def define_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: local directory or Hub id")
    parser.add_argument("--adapter", help="adapter directory or Hub id; without it the base model is evaluated as is")
    parser.add_argument("--token-space", help=f"token space JSON (default: the adapter's own, else {TOKEN_SPACE_NAME}"
                        " in the base directory)")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="examples per forward pass")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype the model is loaded in")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, ...")
    parser.add_argument("--out", help="write the report JSON here (atomically) instead of printing it")


def run_eval(args: argparse.Namespace) -> int:
    from .checks import prepare_eval

    plan = prepare_eval(args)  # everything checked before the model loads
    from ..evaluation import evaluate, load_model, summary
    from ..output import write_text_atomically

    model = load_model(plan.base, plan.adapter, args.dtype, args.device)
    report = evaluate(model, plan.token_space, plan.examples, batch_size=args.batch_size,
                      max_seq_len=args.max_seq_len, truncation_side=args.truncation_side)
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        write_text_atomically(args.out, text)
        print(f"wrote {args.out}: {summary(report, args.max_seq_len)}")
    else:
        print(text, end="")
        print(f"uti-peft eval: {summary(report, args.max_seq_len)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- train
def define_train(parser: argparse.ArgumentParser) -> None:
    """The options of ``uti-peft train`` / ``scripts/train.py`` (read by `uti_peft.training.train`)."""
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="base causal LM: local directory or Hub id")
    source.add_argument(
        "--tiny", nargs="?", const="untied", choices=("untied", "tied"),
        help="use the tiny local Qwen3 and token space instead (no download); 'tied' ties its embeddings",
    )
    model.add_argument("--token-space", help=f"token space JSON (default: {TOKEN_SPACE_NAME} in --base, or the tiny one)")
    model.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype the base is loaded in")
    model.add_argument("--init-adapter", help="start from this saved row-extension adapter (and its LoRA, if any)")
    model.add_argument("--init-rows", choices=INIT_STRATEGIES, default="mean_noise", help="how new rows start")
    model.add_argument("--init-noise-factor", type=float, default=0.02, help="noise scale of mean_noise")
    model.add_argument("--head-rows", choices=HEAD_ROW_MODES, default="trained",
                       help="'mean': no trained head rows (the head's new rows are the mean of its text rows)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=non_negative_int, default=0, help="LoRA rank; 0 trains rows only")
    lora.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    lora.add_argument("--lora-targets", type=names, default=LORA_TARGETS, help="comma-separated module names")

    add_data_arguments(parser.add_argument_group("data"))

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--output-dir", required=True, help="final adapter and checkpoint-<step> directories")
    opt.add_argument("--batch-size", type=positive_int, default=1, help="examples per process per micro-batch")
    opt.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="micro-batches per step")
    opt.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1: --epochs decides")
    opt.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    opt.add_argument("--learning-rate", type=float, default=1e-4, help="learning rate of every group without its own")
    opt.add_argument("--input-rows-lr", type=float, help="learning rate of the input-embedding rows")
    opt.add_argument("--head-rows-lr", type=float, help="learning rate of the lm_head rows (untied bases)")
    opt.add_argument("--lora-lr", type=float, help="learning rate of the LoRA weights")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--lr-scheduler-type", default="linear", help="transformers scheduler name")
    opt.add_argument("--warmup-steps", type=float, default=0, help="warm-up steps (a fraction < 1: of all steps)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    opt.add_argument("--seed", type=int, default=0, help="random seed")

    run = parser.add_argument_group("run")
    run.add_argument("--logging-steps", type=float, default=10, help="log every N steps")
    run.add_argument("--save-steps", type=non_negative_int, default=500,
                     help="checkpoint every N steps; 0: final adapter only")
    run.add_argument("--save-total-limit", type=int, help="keep at most this many checkpoints")
    run.add_argument("--resume-from-checkpoint",
                     help="a checkpoint-<step> directory of a uti-peft train run, or 'latest' in --output-dir")
    run.add_argument("--overwrite-output-dir", action="store_true",
                     help="replace an earlier uti-peft train run in --output-dir (never a directory it did not create)")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    run.add_argument("--deepspeed", metavar="CONFIG",
                     help="DeepSpeed config (JSON), e.g. scripts/deepspeed/zero2.json or zero3.json; start the "
                          "processes with torchrun")
    run.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    run.add_argument("--report-to", default="none", help="Trainer integrations (tensorboard, wandb, ...)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--rank-state-dir", help="also write each process's trained parameters (for checks)")


def run_train(args: argparse.Namespace) -> int:
    from .checks import check_train

    check_train(args)  # paths, sources, token space and data ids before any model loads
    from ..training import train

    trainer = train(args)
    # communication is over: the process group goes while the interpreter is alive; a process that exits with it
    # can abort in gloo's worker threads during finalisation ("terminate called without an active exception")
    trainer.accelerator.end_training()
    return 0


COMMANDS = (
    Command("demo", "run the adapter life cycle on a tiny local model", define_demo, run_demo),
    Command("convert-legacy", "convert a trainable_rows.pt checkpoint into a PEFT adapter", define_convert,
            run_convert),
    Command("export-legacy", "write an adapter back as trainable_rows.pt/.json + token space", define_export,
            run_export),
    Command("inspect", "show what a legacy checkpoint or an adapter holds (no model load)", define_inspect,
            run_inspect),
    Command("push", "upload a saved adapter directory to the Hugging Face Hub", define_push, run_push,
            "Upload ADAPTER_DIR's adapter_config.json, adapter_model.safetensors, token_space.json and README.md "
            "(the model card; rendered if the directory has none of ours), and its LoRA if any, in one commit."),
    Command("merge", "merge an adapter into its base: a standalone checkpoint any engine loads", define_merge,
            run_merge, "Stream BASE's safetensors into OUT with ADAPTER's rows (and LoRA) merged, plus config, "
            "generation config, the tokenizer extended with every modality token, token_space.json and a model card."),
    Command("extract", "turn a resized checkpoint or a PEFT vocabulary adapter into a row-extension adapter",
            define_extract, run_extract,
            "The inverse of merge: SOURCE's new rows (and LoRA) as a small adapter on BASE, after checking that its "
            "text rows equal BASE's and nothing else changed. Example: uti-peft extract Qwen/Qwen3-8B-Base "
            "my-org/qwen3-8b-resized -o my-rows"),
    Command("eval", "mean loss per task on tokenized JSONL", define_eval, run_eval,
            "Mean loss per task (and token-weighted) of a base model, with an adapter if given."),
    Command("train", "train a row-extension adapter (optionally with LoRA) on tokenized JSONL", define_train,
            run_train, "Train a row-extension adapter with transformers' Trainer; run it under `accelerate launch` "
            "for data-parallel training."),
)
