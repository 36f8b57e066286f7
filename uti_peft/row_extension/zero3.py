"""DeepSpeed ZeRO-3 awareness of the row-extension layers, as PEFT's trainable tokens have it.

Under ZeRO-3 every parameter is a partitioned placeholder (``.shape == (0,)``; the real shape is ``ds_shape``)
whose values exist only inside a gather. A view relationship between two parameters cannot survive that, so the
layers record a *partitioned* storage mode there (`RowExtensionLayer.update_layer`): the rows are a ZeRO-managed
parameter of their own, registered with the layer so that ZeRO-3 gathers them around its forward and backward; the
head's weight is extended to ``vocab_size`` rows beside them, and its tail is written from the rows after every
optimizer step (`RowExtensionLayer.sync_tail`, called by `uti_peft.distributed.SyncRowsCallback`). Everything here
is a no-op without a ZeRO-3 config.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn


def zero3_enabled() -> bool:
    """Whether a DeepSpeed ZeRO-3 config is in effect (transformers' ``HfDeepSpeedConfig``, which the Trainer's
    ``TrainingArguments(deepspeed=...)`` creates), as PEFT checks it."""
    from peft.utils.integrations import check_deepspeed_zero3_enabled

    return check_deepspeed_zero3_enabled()


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages this parameter (it carries a ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape, also while ZeRO-3 holds it partitioned (``ds_shape``)."""
    return param.ds_shape if is_partitioned(param) else param.shape


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """The full values of the ZeRO-3 parameters among ``params`` inside the block
    (``deepspeed.zero.GatheredParameters``).

    With ``modifier_rank``, what that rank writes into them is broadcast and partitioned again on exit (shapes must
    not change: DeepSpeed re-partitions with the recorded ``ds_shape``). Plain tensors are left as they are.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def register_external_parameter(module: nn.Module, param: nn.Parameter) -> None:
    """Have ZeRO-3 gather ``param`` around ``module``'s forward and backward
    (``deepspeed.zero.register_external_parameter``): it gathers a module's own parameters only, and the rows live
    in a child ``ParameterDict`` whose forward never runs."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, param)


def is_modifier_rank(rank: int = 0) -> bool:
    """Whether this process writes inside ``gathered(..., modifier_rank=rank)`` (every process, without one)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == rank


def partition_like(reference: nn.Parameter, new: nn.Parameter) -> None:
    """Hand a new, full parameter to ZeRO-3 right away, as ``zero.Init`` partitioned ``reference`` (each process keeps
    its slice; the full tensor is freed). A no-op when ``reference`` is not partitioned: ``deepspeed.initialize``
    then partitions ``new`` with the rest of the model."""
    if is_partitioned(reference):
        reference.convert_to_zero_parameters(param_list=[new])
