"""Multi-process set-ups of ``uti-peft train``: DDP and FSDP2 through ``accelerate launch``, DeepSpeed ZeRO through
``--deepspeed``.

Why FSDP needs care here: on the lm_head (and a tied embedding) the trainable rows parameter is a *view* of
the tail of the base weight (`uti_peft.row_extension.layer`), which is what keeps the logits bit-identical to a merged
model. ``fully_shard`` replaces every parameter it manages by a sharded DTensor with storage of its own, so
it would cut that view: the rows would train while the forward kept using a stale tail. The modules that
hold rows (the `RowExtensionLayer` s: input embedding and lm_head) are therefore *ignored* by FSDP, i.e.
replicated on every process, and everything else (the decoder layers, with their LoRA, and the final norm)
is sharded. FSDP2 does not reduce the gradients of ignored parameters; the Trainer's own
``_sync_replicated_trainable_parameters`` (written for trainable parameters FSDP2 does not manage) averages
them over the processes at the end of each accumulation window, as DDP would.

accelerate 1.15 honours an FSDP config only on accelerators: with CPU processes its state silently falls
back to plain multi-CPU DDP (``AcceleratorState`` applies the FSDP plugin for ``MULTI_GPU``-like types only).
`enable_fsdp_on_cpu` restores what accelerate does on GPUs (distributed type FSDP, the plugin built from the
launcher's environment), so that the very same accelerate FSDP2 code path (``fsdp2_prepare_model``, full
state-dict saving, FSDP checkpoints) runs with gloo on CPU processes.

DeepSpeed (the Trainer's ``deepspeed=`` config, ``--deepspeed``): ZeRO-1/2 move every trainable parameter into
their flat buffers after each step, which cuts the head's rows off its weight's tail; ZeRO-3 partitions both (the
layers' partitioned storage mode, `uti_peft.row_extension.zero3`). `SyncRowsCallback` writes the rows back into
the tail after every optimizer step, so whatever reads the head's weight (a state dict, a 16-bit save, the next
forward) sees the trained rows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import nn

from transformers import TrainerCallback

from .row_extension.layer import RowExtensionLayer
from .row_extension.zero3 import gathered, is_partitioned

if TYPE_CHECKING:
    from transformers import Trainer

    from .data import PreparedExample

RANK_STATE_NAME = "rank{rank}.safetensors"

DEEPSPEED_THROUGH_ACCELERATE = (
    "accelerate launched uti-peft train with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED=true), which is not the "
    "tested way: start the processes with torchrun and give the DeepSpeed config to the script, e.g. "
    "torchrun --nproc_per_node 8 scripts/train.py --deepspeed scripts/deepspeed/zero3.json ..."
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch_environment(deepspeed_config: Optional[str] = None) -> None:
    """Refuse launch set-ups that cannot train rows correctly or were not tested; called before anything is loaded or
    written."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(DEEPSPEED_THROUGH_ACCELERATE)
    if deepspeed_config and "WORLD_SIZE" not in os.environ:  # else DeepSpeed looks for MPI (mpi4py) to find its peers
        raise ValueError(
            f"--deepspeed {deepspeed_config}: DeepSpeed needs a launcher's environment (RANK, WORLD_SIZE, ...); start "
            "the command with torchrun, e.g. torchrun --nproc_per_node 2 scripts/train.py --deepspeed ... "
            "(--nproc_per_node 1 for one process)"
        )
    version = os.environ.get("FSDP_VERSION", "1")
    if fsdp_requested() and version != "2":
        raise ValueError(
            f"FSDP version {version} (accelerate config fsdp_version / FSDP_VERSION) is not supported: FSDP1 flattens "
            "parameters, which breaks the rows that are views of the embedding/lm_head weights; use fsdp_version: 2 "
            "(scripts/accelerate/fsdp2.yaml)"
        )


def init_deepspeed_distributed(cpu: bool) -> None:
    """Set up DeepSpeed's communication before the model is loaded: ZeRO-3 ``zero.Init`` (transformers'
    ``from_pretrained`` under a ZeRO-3 config) partitions while loading. On CPU processes it is gloo (DeepSpeed's CPU
    accelerator would ask for oneCCL)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)


def sync_rows(model: nn.Module) -> None:
    """`RowExtensionLayer.sync_tail` on every row layer: the head's weight tail holds its trained rows again (a
    collective under ZeRO-3: every process calls it)."""
    for module in row_modules(model):
        module.sync_tail()


class SyncRowsCallback(TrainerCallback):
    """Keep the head's weight tail equal to its rows after every optimizer step and at the end of training.

    Needed under DeepSpeed (see the module docstring), harmless elsewhere (rows that are still the tail's view are
    left as they are). `RowExtensionTrainer` adds it; with transformers' own ``Trainer`` and a DeepSpeed config, pass
    ``callbacks=[SyncRowsCallback()]``. Under ZeRO-3 each call gathers the head once (rank 0 writes its tail).
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            sync_rows(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            sync_rows(model)


def enable_fsdp_on_cpu(accelerator: Any) -> bool:
    """Give accelerate's state the FSDP2 set-up it drops on CPU processes; True if it was restored.

    Only when the launcher asked for FSDP and accelerate fell back to ``MULTI_CPU``: what it does itself on
    GPUs (``AcceleratorState.__init__`` sets ``distributed_type = FSDP`` and ``fsdp_plugin``, and copies the
    type into ``PartialState``), with the plugin built from the launcher's environment as accelerate builds it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"FSDP was requested but accelerate set up {state.distributed_type}; cannot shard the model")
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def check_fsdp_plugin(accelerator: Any, activation_checkpointing: bool) -> None:
    """The FSDP plugin in effect must be version 2 (``fsdp_version: 2``), and FSDP's own activation checkpointing
    not combined with ``--gradient-checkpointing`` (the check the Trainer makes when accelerate set FSDP up)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP version {plugin.fsdp_version} is not supported; use fsdp_version: 2")
    if plugin.activation_checkpointing and activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing: true in the accelerate config and --gradient-checkpointing cannot both be "
            "set; drop one"
        )


def row_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding new rows (input embedding, lm_head): kept whole (replicated) under FSDP."""
    return [m for m in model.modules() if isinstance(m, RowExtensionLayer)]


def place_row_modules(model: nn.Module, device: torch.device) -> None:
    """Move the row modules to the training device and re-attach their rows.

    Under FSDP the Trainer leaves the model where it was loaded (``fully_shard`` moves what it manages) and FSDP
    does not move the parameters it ignores, so the replicated row modules are moved here — before the optimizer
    is built and accelerate maps its parameters. (A no-op for CPU processes; on GPUs untested here.)
    """
    for module in row_modules(model):
        module.to(device)
    reattach_rows(model)


def ignore_row_modules(accelerator: Any, model: nn.Module) -> None:
    """Add the row modules to the FSDP plugin's ``ignored_modules`` (keeping any the config already names)."""
    plugin = accelerator.state.fsdp_plugin
    ignored: list[nn.Module] = []
    configured = plugin.ignored_modules
    if isinstance(configured, str):  # accelerate's regex form, matched against module names
        import re

        pattern = re.compile(configured)
        ignored = [m for name, m in model.named_modules() if pattern.fullmatch(name)]
    elif configured is not None:
        ignored = list(configured)
    plugin.ignored_modules = ignored + [m for m in row_modules(model) if all(m is not i for i in ignored)]


def head_weights(model: nn.Module) -> Iterable[tuple[str, int, torch.Tensor]]:
    """``(rows name, text_vocab_size, copy of the base weight)`` of every layer whose weight's tail mirrors rows
    (gathered under ZeRO-3: a collective, every process calls it)."""
    for module_name, module in model.named_modules():
        if not isinstance(module, RowExtensionLayer):
            continue
        for adapter in sorted(a for a in module.text_vocab_size if module.mirrors_rows_in_tail(a)):
            weight = module.base_layer.weight
            with gathered([weight]):
                copy = weight.detach().clone()
            yield f"{module_name}.{module.adapter_layer_names[0]}.{adapter}", module.text_vocab_size[adapter], copy


def rows_views(model: nn.Module) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, rows, weight tail)`` of every in-place rows parameter (lm_head, tied embedding)."""
    for module_name, module in model.named_modules():
        if not isinstance(module, RowExtensionLayer) or module.tied_to is not None:
            continue
        for adapter in sorted(a for a in module.text_vocab_size if module.rows_share_base_storage(a)):
            rows = module.rows(adapter)
            tail = module.base_layer.weight.data[module.text_vocab_size[adapter] :]
            yield f"{module_name}.{module.adapter_layer_names[0]}.{adapter}", rows, tail


def reattach_rows(model: nn.Module) -> None:
    """Give every rows parameter its base weight's dtype again and make the in-place ones views of their weight's
    tail again (`RowExtensionLayer.attach_rows`).

    accelerate's FSDP2 preparation upcasts trainable parameters to float32 under mixed precision
    (``param.data = param.data.float()``): float32 master weights for what FSDP manages. The rows are not
    FSDP-managed, and they keep the base's dtype as they do without FSDP (the lm_head's rows must: they are a
    view of its weight), so the saved adapter is the same whatever the launcher.
    """
    for module in model.modules():
        if not isinstance(module, RowExtensionLayer) or module.tied_to is not None:
            continue
        dtype = module.base_layer.weight.dtype
        for adapter, rows in module.trained_rows.items():
            if module.rows_share_base_storage(adapter):
                module.attach_rows(adapter)
            elif rows.dtype != dtype:
                rows.data = rows.data.to(dtype)


def check_rows_attached(model: nn.Module) -> None:
    """Raise if a rows parameter stopped being the view of its weight's tail (the forward would use stale rows)."""
    from torch.distributed.tensor import DTensor

    for name, rows, tail in rows_views(model):
        shared = (
            not isinstance(rows, DTensor)
            and rows.dtype == tail.dtype
            and rows.shape == tail.shape
            and rows.data_ptr() == tail.data_ptr()
        )
        if not shared:
            raise RuntimeError(f"{name}: the trained rows are no longer the tail of the weight the forward uses")


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters FSDP sharded (DTensors)."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter (a copy where it was gathered): gathered if FSDP sharded it or ZeRO-3
    partitioned it (a collective: call it on every process)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor()
    if is_partitioned(param):
        with gathered([param]):
            return param.detach().clone()
    return param


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``, Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_rank_state(trainer: "Trainer", probe: "PreparedExample", directory: str) -> str:
    """Write this process's trained parameters and its logits on ``probe`` to ``rank<N>.safetensors``.

    For checking multi-process runs: every process must hold the same parameters as the saved adapter, and
    the saved adapter, loaded anew, must reproduce these logits. Parameters FSDP sharded are gathered (every
    process takes part). ``tail.<rows name>`` is the weight tail the lm_head's forward uses, to be compared with
    its rows, and ``weight.<rows name>`` that whole weight (its text rows must be the base's). Under ZeRO-3 with
    ``stage3_gather_16bit_weights_on_model_save``, rank 0 adds ``full16.<key>``: the row layers' entries of the
    consolidated state dict a full 16-bit save writes. Metadata: rank, world size, global step, whether this process
    writes the model (``should_save``), the distributed type, whether the rows are still views of their weight tails,
    and the peak RSS.
    """
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    tensors = {
        name: full_tensor(p).detach().cpu().clone().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    for name, text_vocab_size, weight in head_weights(model):
        tensors[f"tail.{name}"] = weight[text_vocab_size:].cpu().clone()
        tensors[f"weight.{name}"] = weight.cpu().contiguous()
    engine = trainer.model_wrapped
    if trainer.is_deepspeed_enabled and getattr(engine, "zero_gather_16bit_weights_on_model_save", bool)():
        layers = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, RowExtensionLayer))
        full = trainer.accelerator.get_state_dict(engine) or {}  # a collective; the dict on rank 0 only
        tensors.update({f"full16.{k}": v.cpu().contiguous() for k, v in full.items() if k.startswith(layers)})
    try:
        check_rows_attached(model)
        attached = True
    except RuntimeError:
        attached = False
    model.eval()
    with torch.no_grad():
        input_ids = torch.tensor([probe.input_ids], device=trainer.args.device)
        tensors["logits"] = model(input_ids=input_ids).logits.float().cpu().contiguous()
    metadata = {
        "rank": str(trainer.args.process_index),
        "world_size": str(trainer.args.world_size),
        "global_step": str(trainer.state.global_step),
        "should_save": str(trainer.args.should_save),
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "rows_attached": str(attached),
        "sharded_parameters": ",".join(sharded_parameter_names(model)),
        "partitioned_parameters": ",".join(n for n, p in model.named_parameters() if is_partitioned(p)),
        "peak_rss_bytes": str(peak_rss_bytes()),
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RANK_STATE_NAME.format(rank=trainer.args.process_index))
    save_file(tensors, path, metadata=metadata)
    return path
