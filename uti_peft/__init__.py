"""uti-peft: vocabulary-extension adapters (new token rows) as a PEFT method.

``import uti_peft`` registers the ``ROW_EXTENSION`` method with PEFT, after which
``PeftModel.from_pretrained(base, adapter)`` resizes the base and patches the new rows in.

The registration (the method, the model-card writer, the Hub integration) happens when peft is imported, or
transformers loads an adapter — at once if peft already is; see `uti_peft_autoload`, which an installed uti-peft
also runs at interpreter start-up — and the public names below are imported on first use, so that
``import uti_peft`` (and the ``uti-peft`` command line, whose modules live here) imports no torch, transformers
or peft by itself.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

import uti_peft_autoload

try:
    __version__ = metadata.version("uti-peft")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_PUBLIC = {
    "RowExtensionConfig": "row_extension",
    "RowExtensionEmbedding": "row_extension",
    "RowExtensionLayer": "row_extension",
    "RowExtensionLinear": "row_extension",
    "RowExtensionModel": "row_extension",
    "add_lora": "row_extension",
    "register": "row_extension",
    "RowExtensionError": "errors",
    "TokenSpaceError": "errors",
    "convert_legacy": "legacy",
    "export_legacy": "legacy",
    "MergeError": "errors",
    "UnsupportedVersionError": "errors",
    "merge_adapter": "merge",
    "TokenRange": "token_space",
    "TokenSpace": "token_space",
    "add_modality_tokens": "tokenizer",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's module on first use (``uti_peft.TokenSpace``, ``from uti_peft import …``)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'uti_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


uti_peft_autoload.install()
