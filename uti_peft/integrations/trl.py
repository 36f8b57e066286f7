"""TRL's trainers for models that carry a row-extension adapter: ``from uti_peft.integrations.trl import SFTTrainer``.

TRL >= 1.15 computes its losses with a fused, chunked log-prob head that reads ``lm_head.weight`` and never calls the
module, and its trainers refuse, at construction, a PEFT model whose output embedding is a tuner layer (a LoRA there
would silently never train). A row-extension head is the exception: its ``.weight`` is the extended matrix,
differentiable with respect to the new rows (`RowExtensionLinear.get_merged_weights`), so the fused head trains them.
The trainers below are TRL's own, with that one refusal lifted for row-extension heads, and only while the trainer is
being built; every other adapter on the head is refused exactly as TRL refuses it. Nothing changes for code that does
not use these classes. The reference policy of DPO (``ref_model=None``) and GRPO (``beta > 0``) is the adapter with
adapters disabled: the rows it started from (see `RowExtensionLayer.enable_adapters`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer

try:
    import trl
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError("uti_peft.integrations.trl needs TRL >= 1.15: pip install 'uti-peft[trl]'") from exc

from ..row_extension import RowExtensionLayer


class _OtherTunerLayerMeta(type):
    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, BaseTunerLayer) and not isinstance(instance, RowExtensionLayer)


class _TunerLayerOtherThanRows(metaclass=_OtherTunerLayerMeta):
    """What TRL's "adapter on lm_head" check tests for while our trainers are built: any tuner layer but ours."""


@contextlib.contextmanager
def _row_heads_accepted(trainer_cls: type) -> Iterator[None]:
    """TRL's trainer modules test ``isinstance(head, BaseTunerLayer)`` against their module-level name: point that
    name at `_TunerLayerOtherThanRows` in the modules of ``trainer_cls``'s TRL classes, and back afterwards."""
    modules = {sys.modules[cls.__module__] for cls in trainer_cls.__mro__ if cls.__module__.startswith("trl.")}
    patched = [m for m in modules if getattr(m, "BaseTunerLayer", None) is BaseTunerLayer]
    for module in patched:
        module.BaseTunerLayer = _TunerLayerOtherThanRows
    try:
        yield
    finally:
        for module in patched:
            module.BaseTunerLayer = BaseTunerLayer


def accepting_row_heads(trainer_cls: type) -> type:
    """A subclass of the TRL trainer ``trainer_cls`` that accepts a row-extension lm_head (and nothing else new)."""

    def __init__(self, *args, **kwargs) -> None:
        with _row_heads_accepted(trainer_cls):
            trainer_cls.__init__(self, *args, **kwargs)

    doc = f"TRL's `{trainer_cls.__name__}`, accepting a model whose lm_head carries a row-extension adapter."
    return type(trainer_cls.__name__, (trainer_cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


SFTTrainer = accepting_row_heads(trl.SFTTrainer)
DPOTrainer = accepting_row_heads(trl.DPOTrainer)
GRPOTrainer = accepting_row_heads(trl.GRPOTrainer)

__all__ = ["DPOTrainer", "GRPOTrainer", "SFTTrainer", "accepting_row_heads"]
