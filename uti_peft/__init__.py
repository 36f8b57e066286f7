"""uti-peft: vocabulary-extension adapters (new token rows) as a PEFT method.

``import uti_peft`` registers the ``ROW_EXTENSION`` method with PEFT, after which
``PeftModel.from_pretrained(base, adapter)`` resizes the base and patches the new rows in. (An installed
uti-peft also registers itself the first time peft is imported; see `uti_peft_autoload`.)
"""

from . import card as _card  # noqa: F401  (registers the model card writer for saved adapters)
from . import hub as _hub
from .errors import RowExtensionError, TokenSpaceError
from .legacy import convert_legacy, export_legacy
from .merge import MergeError, merge_adapter
from .row_extension import (
    RowExtensionConfig,
    RowExtensionEmbedding,
    RowExtensionLayer,
    RowExtensionLinear,
    RowExtensionModel,
    add_lora,
    register,
)
from .token_space import TokenRange, TokenSpace

_hub.install()

__version__ = "0.1.0"

__all__ = [
    "MergeError",
    "RowExtensionConfig",
    "RowExtensionEmbedding",
    "RowExtensionError",
    "RowExtensionLayer",
    "RowExtensionLinear",
    "RowExtensionModel",
    "TokenRange",
    "TokenSpace",
    "TokenSpaceError",
    "add_lora",
    "convert_legacy",
    "export_legacy",
    "merge_adapter",
    "register",
]
