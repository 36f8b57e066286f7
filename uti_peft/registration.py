"""Make ``ROW_EXTENSION`` a PEFT method of the installed, unmodified peft.

Two things PEFT offers no public hook for, done once at import:

* ``PeftType`` is a closed enum and ``register_peft_method`` refuses names it lacks, so the member is
  added to the enum's member maps first.
* With embeddings among the targets, or a vocabulary that differs from the base config's, PEFT's
  ``save_embedding_layers="auto"`` saves the *whole* embedding and lm_head beside the adapter. A
  row-extension adapter is exactly the record of that resize, so for models carrying one, "auto" means
  "rows only". An explicit ``save_embedding_layers=True`` is still honoured.
* ``push_to_hub`` (inherited from transformers) replaces the saved ``README.md`` with a generic card; for
  models carrying this adapter it uploads our card instead (see `uti_peft.hub.install`).
"""

from __future__ import annotations

import functools
import sys

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "ROW_EXTENSION"


def _add_peft_type_member() -> None:
    if PEFT_TYPE_NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)


def _carries_row_extension(model) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "peft_type", None) == PeftType.ROW_EXTENSION for c in configs.values())


def _rows_only_by_default(get_peft_model_state_dict):
    @functools.wraps(get_peft_model_state_dict)
    def wrapper(model, state_dict=None, adapter_name="default", unwrap_compiled=False, save_embedding_layers="auto"):
        if save_embedding_layers == "auto" and _carries_row_extension(model):
            save_embedding_layers = False
        return get_peft_model_state_dict(
            model,
            state_dict=state_dict,
            adapter_name=adapter_name,
            unwrap_compiled=unwrap_compiled,
            save_embedding_layers=save_embedding_layers,
        )

    wrapper.__uti_peft_wrapped__ = True
    return wrapper


def _install_rows_only_saving() -> None:
    from peft.utils import save_and_load

    original = save_and_load.get_peft_model_state_dict
    if getattr(original, "__uti_peft_wrapped__", False):
        return
    wrapped = _rows_only_by_default(original)
    # rebind every module-level reference peft holds (peft_model.py, peft.utils, peft, ...)
    for name, module in list(sys.modules.items()):
        if (name == "peft" or name.startswith("peft.")) and getattr(module, "get_peft_model_state_dict", None) is original:
            setattr(module, "get_peft_model_state_dict", wrapped)


def register() -> None:
    """Idempotently register the method with PEFT (called by ``import uti_peft``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import RowExtensionConfig
    from .model import RowExtensionModel

    _add_peft_type_member()
    if PeftType.ROW_EXTENSION not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=RowExtensionConfig, model_cls=RowExtensionModel,
            prefix=RowExtensionModel.prefix,
        )
    _install_rows_only_saving()

    from ._compat import install_transformers_doors
    from .hub import install as install_hub_integration

    install_hub_integration()
    install_transformers_doors()
