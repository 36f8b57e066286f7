"""Training of row-extension adapters (optionally with LoRA) on tokenized JSONL: ``uti-peft train``.

The loop is transformers' `Trainer`, so one process, DDP or FSDP2 processes under ``accelerate launch``,
bf16 autocast, gradient accumulation, gradient checkpointing, periodic checkpoints and resuming all come
from it. What this module adds is what the Trainer cannot know:

- the model: a base (``--base`` or the tiny local Qwen3) wrapped with a new row-extension adapter, or with a
  saved one (``--init-adapter``), plus LoRA when ``--lora-r`` > 0 (`uti_peft.add_lora`);
- the tokenizer: the base's, extended with every modality token, saved beside the adapter (and in checkpoints)
  as the Trainer saves a ``processing_class``, so ``pipeline(model=OUTPUT_DIR)`` finds it;
- the data: our users' JSONL, validated, truncated and padded by `uti_peft.data` exactly as ``uti-peft eval``
  scores it;
- the optimizer: AdamW with one parameter group (and learning rate) per kind of trained parameter: input
  rows, head rows, LoRA. Only trained parameters are given to it, so its state holds rows (and LoRA) only;
- the logs: a running loss per task (``loss/<task>``), summed over processes;
- FSDP2 (``accelerate launch --config_file scripts/accelerate/fsdp2.yaml``) with the row modules kept whole, and
  DeepSpeed ZeRO-2/3 (``torchrun ... --deepspeed scripts/deepspeed/zero3.json``) with the head's tail kept equal to
  its rows (`uti_peft.distributed`);
- an ``--output-dir`` that never clobbers what this command did not write (`uti_peft.output_dir`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional, Sequence

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from .constants import TOKEN_SPACE_NAME
from .row_extension.config import RowExtensionConfig, find_row_extension_adapter
from .row_extension.lora import add_lora
from .data import (
    TASK_INDEX_KEY,
    PaddingCollator,
    PreparedExample,
    check_window,
    prepare,
    read_jsonl,
    scored_token_losses,
    task_list,
)
from .distributed import (
    SyncRowsCallback,
    check_fsdp_plugin,
    check_launch_environment,
    check_rows_attached,
    enable_fsdp_on_cpu,
    ignore_row_modules,
    init_deepspeed_distributed,
    place_row_modules,
    reattach_rows,
    write_rank_state,
)
from .files import DTYPES
from .output_dir import check_output_dir
from .tiny import build_tiny_qwen3, build_tiny_tokenizer, tiny_token_space
from .token_space import TokenSpace, resolve_token_space
from .tokenizer import add_modality_tokens, has_tokenizer_files, load_extended_tokenizer

logger = logging.get_logger(__name__)

# Parameter group name -> the substring that marks its parameters (PEFT names them after these attributes).
PARAMETER_GROUPS = {
    "input_rows": "row_extension_input_rows",
    "head_rows": "row_extension_output_rows",
    "lora": "lora_",
}


# ---------------------------------------------------------------------------------------- model
def load_base(args: argparse.Namespace) -> torch.nn.Module:
    """The base causal LM: ``--tiny`` builds the local tiny Qwen3 (no download), else ``--base`` is loaded."""
    dtype = DTYPES[args.dtype]
    if args.tiny:
        return build_tiny_qwen3(tied=args.tiny == "tied", dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)


def token_space_of(args: argparse.Namespace) -> TokenSpace:
    """``--token-space``, else the tiny token space with ``--tiny``, else ``token_space.json`` in the base directory."""
    space = resolve_token_space(args.token_space or (tiny_token_space() if args.tiny else None), args.base)
    if space is None:
        raise FileNotFoundError(f"no {TOKEN_SPACE_NAME} in {args.base}; pass --token-space")
    return space


def extended_tokenizer(args: argparse.Namespace, token_space: TokenSpace) -> Optional[Any]:
    """The base's tokenizer with every modality token added: the tiny one with ``--tiny``, else ``--base``'s. None,
    with a warning, when the base has none or it does not fit the token space (training does not need it)."""
    try:
        if args.tiny:
            tokenizer = build_tiny_tokenizer(token_space.text_vocab_size)
            add_modality_tokens(tokenizer, token_space)
            return tokenizer
        if os.path.isdir(args.base) and not has_tokenizer_files(args.base):
            raise ValueError(f"base {args.base!r} has no tokenizer files")
        return load_extended_tokenizer(args.base, token_space)
    except ValueError as exc:
        logger.warning(f"{exc}; {args.output_dir} will hold no tokenizer")
        return None


def build_model(base: torch.nn.Module, args: argparse.Namespace) -> PeftModel:
    """Wrap ``base`` with a trainable row-extension adapter (new, or ``--init-adapter``) and LoRA if asked.

    A saved adapter that already holds LoRA layers brings them along (trainable); ``--lora-*`` then do not
    add a second LoRA.
    """
    if args.init_adapter:
        model = PeftModel.from_pretrained(base, args.init_adapter, is_trainable=True)
        _check_token_space_matches(args, find_row_extension_adapter(model.peft_config)[1])
    else:
        config = RowExtensionConfig(
            token_space=token_space_of(args),
            init_rows=args.init_rows,
            init_noise_factor=args.init_noise_factor,
            head_rows=args.head_rows,
        )
        model = get_peft_model(base, config)
    if args.lora_r and find_row_extension_adapter(model.peft_config)[1].lora_adapter:
        logger.warning(f"{args.init_adapter} already holds LoRA layers: training them; --lora-* options are ignored")
    elif args.lora_r:
        model = _add_lora(model, args)
    return model


def _check_token_space_matches(args: argparse.Namespace, config: RowExtensionConfig) -> None:
    if args.token_space and TokenSpace.from_file(args.token_space).sha256() != config.token_space_sha256:
        raise ValueError(
            f"--token-space {args.token_space} differs from the token space of --init-adapter {args.init_adapter} "
            f"(sha256 {config.token_space_sha256}); the adapter's rows are laid out for its own"
        )


def _add_lora(model: PeftModel, args: argparse.Namespace) -> PeftModel:
    from peft import LoraConfig

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_targets),
        task_type="CAUSAL_LM",
    )
    return add_lora(model, config)


# ---------------------------------------------------------------------------------------- data
def load_examples(
    path: str, token_space: TokenSpace, max_seq_len: int, truncation_side: str
) -> list[PreparedExample]:
    """Read, validate and truncate the training data; examples left with nothing to score are dropped."""
    check_window(max_seq_len, truncation_side)
    prepared = [prepare(e, token_space, max_seq_len, truncation_side) for e in read_jsonl(path)]
    kept = [e for e in prepared if e.has_scored_tokens]
    if not kept:
        raise ValueError(f"{path}: no example has a token to score (every example is empty or fully ignored)")
    if len(kept) < len(prepared):
        logger.warning(f"{path}: {len(prepared) - len(kept)} examples have no token to score and are skipped")
    return kept


# ---------------------------------------------------------------------------------------- optimizer
def parameter_groups(
    model: torch.nn.Module, learning_rates: Mapping[str, float], weight_decay: float
) -> list[dict[str, Any]]:
    """One optimizer group per kind of trained parameter (see `PARAMETER_GROUPS`), each with its learning rate.

    Groups are found by parameter name, so a model wrapped by accelerate (``module.`` prefixes) works the
    same. Frozen parameters are left out: no optimizer state is ever allocated for the base. A trained
    parameter of no known kind is refused rather than trained at a guessed rate.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {group: [] for group in PARAMETER_GROUPS}
    unknown = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g for g, marker in PARAMETER_GROUPS.items() if marker in name), None)
        if group is None:
            unknown.append(name)
        else:
            groups[group].append(param)
    if unknown:
        raise ValueError(f"trainable parameters outside the row-extension rows and LoRA: {unknown[:5]}")
    return [
        {"params": params, "lr": learning_rates[group], "weight_decay": weight_decay, "name": group}
        for group, params in groups.items()
        if params
    ]


# ---------------------------------------------------------------------------------------- per-task loss
class TaskLossMeter:
    """Summed token loss and scored-token count per task since the last report.

    The task list is fixed (every process derives it from the same data), so every process reduces a
    tensor of the same shape at the same step: the reduction is a collective all of them take part in.
    """

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        self._totals: Optional[torch.Tensor] = None  # [2, tasks]: loss sums, token counts (float64)

    def update(self, losses: torch.Tensor, rows: torch.Tensor, task_index: torch.Tensor) -> None:
        """Add a batch's scored token losses (`scored_token_losses`) and the batch row of each."""
        with torch.no_grad():
            task_of_token = task_index.to(rows.device)[rows]
            totals = self._buffer(losses.device)
            totals[0].index_add_(0, task_of_token, losses.double())
            totals[1].index_add_(0, task_of_token, torch.ones_like(losses, dtype=torch.float64))

    def report(self, accelerator) -> dict[str, float]:
        """``{"loss/<task>": token-weighted mean}`` over all processes since the last report (collective)."""
        totals = accelerator.reduce(self._buffer(accelerator.device), reduction="sum")
        self._totals = None
        sums, counts = totals.tolist()
        return {f"loss/{task}": s / n for task, s, n in zip(self.tasks, sums, counts) if n > 0}

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._totals is None:
            self._totals = torch.zeros((2, len(self.tasks)), dtype=torch.float64, device=device)
        return self._totals


# ---------------------------------------------------------------------------------------- trainer
class RowExtensionTrainer(Trainer):
    """`Trainer` with per-kind learning rates and a per-task running loss in its logs.

    Args:
        tasks: The data set's task names (`uti_peft.data.task_list`); batches carry ``task_index`` into it.
        learning_rates: Learning rate of each group of `PARAMETER_GROUPS` (``input_rows``, ``head_rows``, ``lora``).
    """

    def __init__(self, *args: Any, tasks: Sequence[str], learning_rates: Mapping[str, float], **kwargs: Any):
        self.learning_rates = dict(learning_rates)
        self.task_losses = TaskLossMeter(tasks)
        self._task_index: Optional[torch.Tensor] = None
        super().__init__(*args, compute_loss_func=self._token_loss, **kwargs)
        self.add_callback(SyncRowsCallback)  # the head's weight tail follows its rows (DeepSpeed re-points them)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; FSDP2 checked and, on CPU processes, restored
        (`uti_peft.distributed.enable_fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator, self.args.activation_checkpointing)
            if not hasattr(self, "_sync_replicated_trainable_parameters"):
                raise ValueError(
                    "FSDP2 training of rows needs transformers' Trainer._sync_replicated_trainable_parameters "
                    f"(transformers 5.24 has it; this is {transformers.__version__})"
                )

    def _prepare_for_training(self, *args: Any, **kwargs: Any):
        """Under FSDP: keep the row modules whole (ignored by FSDP, see `uti_peft.distributed`), average their
        gradients over the processes, and check that the rows are still the views the forward uses."""
        if self.is_fsdp_enabled:
            place_row_modules(self.model, self.accelerator.device)
            ignore_row_modules(self.accelerator, self.model)
        model, dataloader = super()._prepare_for_training(*args, **kwargs)
        if self.is_fsdp_enabled:
            # transformers' own hook-up for trainable parameters FSDP2 does not manage: broadcast from rank 0,
            # then all-reduce (mean) their gradients at the end of each accumulation window.
            self._sync_replicated_trainable_parameters(model)
            reattach_rows(self.model)
            check_rows_attached(self.model)
        return model, dataloader

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings (AdamW by default), over `parameter_groups`."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(opt_model, self.learning_rates, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ) -> Any:
        """The Trainer's loss (computed by `_token_loss`); ``task_index`` is bookkeeping, not a model input."""
        task_index = inputs.pop(TASK_INDEX_KEY, None)
        self._task_index = task_index if model.training else None
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _token_loss(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor] = None):
        """The causal-LM loss from the scored token losses, computed once for the loss and the per-task meter:
        their sum over the accumulated batch's token count (``num_items_in_batch``), else their mean, as
        transformers' own causal-LM loss does."""
        losses, rows = scored_token_losses(outputs["logits"], labels)
        if self._task_index is not None:
            self.task_losses.update(losses.detach(), rows, self._task_index)
        count = num_items_in_batch if num_items_in_batch is not None else losses.numel()
        if torch.is_tensor(count):
            count = count.to(losses.device)
        return losses.sum() / count

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Training logs (the ones with ``loss``, logged at the same step on every process) get ``loss/<task>``."""
        if "loss" in logs:
            logs.update(self.task_losses.report(self.accelerator))
        super().log(logs, start_time)


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    """The command line's options as `TrainingArguments`."""
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        use_cpu=args.cpu,
        dataloader_num_workers=args.num_workers,
        # pinned memory serves copies to an accelerator; without one torch warns at every start
        dataloader_pin_memory=not args.cpu and torch.accelerator.is_available(),
        remove_unused_columns=False,  # the collator's task_index must reach compute_loss
        ddp_find_unused_parameters=False,  # every trained parameter gets a gradient at every step
        report_to=args.report_to,
        disable_tqdm=args.no_progress or None,
        deepspeed=args.deepspeed,
    )


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    """Per-group learning rates; a group without its own option uses ``--learning-rate``."""
    own = {"input_rows": args.input_rows_lr, "head_rows": args.head_rows_lr, "lora": args.lora_lr}
    return {group: args.learning_rate if lr is None else lr for group, lr in own.items()}


def train(args: argparse.Namespace) -> RowExtensionTrainer:
    """Build the model and data, train, and write the final adapter to ``--output-dir`` (main process only).

    The launch set-up and ``--output-dir`` are checked first (`uti_peft.distributed.check_launch_environment`,
    `uti_peft.output_dir.check_output_dir`), before the model is loaded; the run's marker is written once the
    model, the data and the Trainer are ready, and a start that fails before removes a directory it created.
    The process group stays up for the caller; ``uti-peft train`` ends it with ``trainer.accelerator.end_training()``.
    """
    check_launch_environment(args.deepspeed)
    plan = check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint, args.init_adapter)
    try:
        trainer, examples = _build_trainer(args)
        trainer.accelerator.wait_for_everyone()  # every process has checked the directory before it is claimed
        plan.claim(trainer.args.should_save)
    except BaseException:
        plan.abandon()
        raise
    resume = True if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    check_rows_attached(trainer.accelerator.unwrap_model(trainer.model))
    if args.rank_state_dir:
        write_rank_state(trainer, examples[0], args.rank_state_dir)
    return trainer


def _build_trainer(args: argparse.Namespace) -> tuple[RowExtensionTrainer, list[PreparedExample]]:
    if args.deepspeed:
        init_deepspeed_distributed(args.cpu)
    # before the model: under a ZeRO-3 config, the arguments' DeepSpeed config makes from_pretrained partition the
    # base as it loads (zero.Init) and the row layers record their partitioned mode
    training_args = training_arguments(args)
    set_seed(args.seed)  # before the model: new rows and LoRA are initialised at random, alike on every process
    model = build_model(load_base(args), args)
    token_space = find_row_extension_adapter(model.peft_config)[1].get_token_space()
    examples = load_examples(args.data, token_space, args.max_seq_len, args.truncation_side)
    tasks = task_list(examples)
    trainer = RowExtensionTrainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=PaddingCollator(token_space.pad_token_id, tasks),
        processing_class=extended_tokenizer(args, token_space),
        tasks=tasks,
        learning_rates=learning_rates(args),
    )
    return trainer, examples
