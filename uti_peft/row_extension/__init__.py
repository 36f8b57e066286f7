"""The ROW_EXTENSION PEFT method: `RowExtensionConfig`, the layers and the tuner, read like any PEFT tuner.

Importing this package registers the method with PEFT (as PEFT's own tuners do with ``register_peft_method``),
after `uti_peft.row_extension._compat` has given PEFT and transformers what they need for it.
"""

from peft.utils import register_peft_method

from . import _compat
from .config import RowExtensionConfig, find_row_extension_adapter
from .layer import RowExtensionEmbedding, RowExtensionLayer, RowExtensionLinear
from .lora import add_lora
from .model import RowExtensionModel


def register() -> None:
    """Idempotently register the method with PEFT (done on import)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    _compat.add_peft_type_member()
    if PeftType.ROW_EXTENSION not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(
            name="row_extension", config_cls=RowExtensionConfig, model_cls=RowExtensionModel,
            prefix=RowExtensionModel.prefix,
        )
    _compat.install()


register()

__all__ = [
    "RowExtensionConfig",
    "RowExtensionEmbedding",
    "RowExtensionLayer",
    "RowExtensionLinear",
    "RowExtensionModel",
    "add_lora",
    "find_row_extension_adapter",
    "register",
]
