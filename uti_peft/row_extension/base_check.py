"""Does an adapter fit the base it is loaded onto? Shapes are checked (an error), names compared (a warning)."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Optional

from ..errors import BaseModelMismatchError, BaseModelMismatchWarning
from .config import RowExtensionConfig


def check_base_model(config: RowExtensionConfig, model: Any, *, adapter_hidden_size: Optional[int] = None) -> None:
    """Check an adapter against the base it is loaded onto: raise on shapes, warn on names.

    Raises `BaseModelMismatchError` when the adapter's rows have another hidden size than the base's input
    embedding (``adapter_hidden_size``, from the saved rows) or the base has fewer embedding rows than the
    token space's text vocabulary. Warns (`BaseModelMismatchWarning`) when the adapter records another base
    name (``base_model_name_or_path``) than the model's ``name_or_path``; local copies and Hub cache paths of
    the same repo count as the same name.
    """
    source = getattr(config, "weights_source", None)
    adapter = f"adapter {source[0]!r}" if source else "the adapter"
    made_for = config.base_model_name_or_path
    base_name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    made_for_text = f" was made for {made_for!r}" if made_for else ""
    base_text = f" ({base_name!r})" if base_name else ""
    embedding = model.get_input_embeddings()
    rows, hidden = embedding.weight.shape
    if adapter_hidden_size is not None and adapter_hidden_size != hidden:
        raise BaseModelMismatchError(
            f"{adapter}{made_for_text} with hidden size {adapter_hidden_size}; the base model{base_text} has "
            f"hidden size {hidden}: load it onto the base it was trained on"
        )
    if rows < config.text_vocab_size:
        raise BaseModelMismatchError(
            f"{adapter}{made_for_text}: its token space keeps {config.text_vocab_size} text rows but the base "
            f"model{base_text} has only {rows} embedding rows: load it onto the base it was trained on"
        )
    if made_for and base_name and not same_model_name(made_for, base_name):
        warnings.warn(
            f"{adapter} was saved from base {made_for!r} but is being loaded onto {base_name!r}; the shapes fit, "
            "but unless it is a copy of the same weights the text rows the adapter was trained with differ",
            BaseModelMismatchWarning,
            stacklevel=2,
        )


def same_model_name(a: str, b: str) -> bool:
    """Whether two ``name_or_path`` values name the same model: equal ids, or a Hub cache snapshot path or a
    local directory whose last component is the repo's name (``/models/Qwen3-8B`` ~ ``Qwen/Qwen3-8B``)."""
    a, b = _canonical_name(a), _canonical_name(b)
    if a == b:
        return True
    return a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+")


def _canonical_name(name: str) -> str:
    name = os.fspath(name).replace(os.sep, "/").rstrip("/")
    match = _CACHE_SNAPSHOT.search(name)
    if match:
        return f"{match.group('org')}/{match.group('name')}"
    return name
