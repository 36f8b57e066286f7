"""Multi-process set-ups of ``uti-peft train``: DDP and FSDP2 through ``accelerate launch``; DeepSpeed refused.

Why FSDP needs care here: on the lm_head (and a tied embedding) the trainable rows parameter is a *view* of
the tail of the base weight (`uti_peft.layer`), which is what keeps the logits bit-identical to a merged
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
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from .layer import RowExtensionLayer

DEEPSPEED_UNSUPPORTED = (
    "DeepSpeed is not supported by uti-peft train yet (accelerate launched it with a DeepSpeed config: "
    "ACCELERATE_USE_DEEPSPEED=true): ZeRO-3 partitions parameters, which breaks the rows that are views of the "
    "embedding/lm_head weights, and no DeepSpeed run has been tested. Use DDP (--multi_gpu) or FSDP2 "
    "(--config_file scripts/accelerate/fsdp2.yaml)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch_environment() -> None:
    """Refuse launch set-ups that cannot train rows correctly; called before anything is loaded or written."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(DEEPSPEED_UNSUPPORTED)
    version = os.environ.get("FSDP_VERSION", "1")
    if fsdp_requested() and version != "2":
        raise ValueError(
            f"FSDP version {version} (accelerate config fsdp_version / FSDP_VERSION) is not supported: FSDP1 flattens "
            "parameters, which breaks the rows that are views of the embedding/lm_head weights; use fsdp_version: 2 "
            "(scripts/accelerate/fsdp2.yaml)"
        )


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


def check_fsdp_plugin(accelerator: Any) -> None:
    """The FSDP plugin in effect must be version 2 (``fsdp_version: 2``)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP version {plugin.fsdp_version} is not supported; use fsdp_version: 2")


def row_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding new rows (input embedding, lm_head): kept whole (replicated) under FSDP."""
    return [m for m in model.modules() if isinstance(m, RowExtensionLayer)]


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


def rows_views(model: nn.Module) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, rows, weight tail)`` of every in-place rows parameter (lm_head, tied embedding)."""
    for module_name, module in model.named_modules():
        if not isinstance(module, RowExtensionLayer) or module.tied_to is not None:
            continue
        for adapter in sorted(module._in_place):
            rows = module.rows(adapter)
            tail = module.base_layer.weight.data[module.text_vocab_size[adapter] :]
            yield f"{module_name}.{module.adapter_layer_names[0]}.{adapter}", rows, tail


def reattach_rows(model: nn.Module) -> None:
    """Make every rows parameter the view of its weight's tail again (`RowExtensionLayer.attach_rows`).

    accelerate's FSDP2 preparation upcasts trainable parameters to float32 under mixed precision
    (``param.data = param.data.float()``), which gives bf16 rows storage of their own; the layer's own
    re-attachment copies their values back into the tail and makes them its view again (bf16, as without FSDP).
    """
    for module in model.modules():
        if isinstance(module, RowExtensionLayer) and module.tied_to is None:
            for adapter in sorted(module._in_place):
                module.attach_rows(adapter)


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
    """The whole value of a parameter, gathered if FSDP sharded it (a collective: call it on every process)."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


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
