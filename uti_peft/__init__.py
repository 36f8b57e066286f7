"""uti-peft: vocabulary-extension adapters (new token rows) as a PEFT method.

``import uti_peft`` registers the ``ROW_EXTENSION`` method with PEFT, after which
``PeftModel.from_pretrained(base, adapter)`` resizes the base and patches the new rows in.
"""

from .config import RowExtensionConfig
from .layer import RowExtensionEmbedding, RowExtensionLayer, RowExtensionLinear
from .legacy import convert_legacy, export_legacy
from .lora import add_lora
from .model import RowExtensionError, RowExtensionModel
from .registration import register
from .token_space import TokenRange, TokenSpace, TokenSpaceError

register()

__version__ = "0.1.0"

__all__ = [
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
    "register",
]
