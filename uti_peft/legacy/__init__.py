"""Legacy ``trainable_rows.pt`` checkpoints <-> row-extension PEFT adapters, bit-exact and safe.

A legacy checkpoint directory holds ``trainable_rows.pt`` (a ``torch.save``d dict: ``row_start``,
``row_end``, ``base_llm``, ``embeddings``, ``lm_head`` or None, ``dtype``), ``trainable_rows.json``
(``row_start``, ``row_end``, ``base_llm``, ``has_lm_head``) and usually ``token_space.json``.

* `convert_legacy` turns one into a PEFT adapter directory (config, rows, token space, model card);
* `export_legacy` writes the three legacy files back from an adapter;
* `inspect_checkpoint` says what either holds without loading a model.

Nothing pickled is ever executed (``torch.load(weights_only=True)``), everything is validated before
anything is written, and outputs appear atomically (temporary directory beside the target, renamed at
the end): on any error nothing is left behind.
"""

from ..errors import LegacyCheckpointError
from .checkpoint import LegacyCheckpoint, read_legacy
from .convert import convert_legacy
from .export import export_legacy, read_adapter
from .inspect import inspect_checkpoint

__all__ = [
    "LegacyCheckpoint",
    "LegacyCheckpointError",
    "convert_legacy",
    "export_legacy",
    "inspect_checkpoint",
    "read_adapter",
    "read_legacy",
]
