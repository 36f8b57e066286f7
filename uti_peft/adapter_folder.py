"""A saved row-extension adapter directory, validated once for every command that reads one (push, merge, export,
inspect): the files present, the type, the token space, and the rows' shapes from the safetensors header, without
loading a tensor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from peft.utils import PeftType

from .adapter_location import describe_folder
from .constants import CARD_NAME, CONFIG_NAME, TOKEN_SPACE_NAME, WEIGHTS_NAME
from .errors import AdapterNotFoundError, TokenSpaceError, WrongAdapterTypeError
from .files import SAFETENSORS_DTYPES, read_safetensors_header, rows_bytes_of_file
from .row_extension.config import RowExtensionConfig
from .row_extension.saved_rows import check_row_blocks
from .token_space import TokenSpace

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKEN_SPACE_NAME, CARD_NAME)


@dataclass
class AdapterFolder:
    """A validated adapter directory, ready to push."""

    path: str
    config: RowExtensionConfig
    rows_bytes: int
    hidden_size: int
    tensors: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """The files a push uploads: `ADAPTER_FILES` and the LoRA adapter's, if any."""
        return (*ADAPTER_FILES, *_lora_files(self.config))


def check_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Check that ``path`` holds a complete, self-consistent row-extension adapter, rows only.

    Raises `AdapterNotFoundError` (missing files), `WrongAdapterTypeError` (another peft_type) or
    `RowExtensionError` (files that disagree), naming the file and the values.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterNotFoundError(f"{path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise AdapterNotFoundError(f"{path!r} has no {CONFIG_NAME}: not a saved PEFT adapter ({describe_folder(path)})")
    with open(config_file, encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    check_peft_type(peft_type, where=config_file)
    config = RowExtensionConfig.from_pretrained(path)
    for name in (WEIGHTS_NAME, TOKEN_SPACE_NAME, *_lora_files(config)):
        if not os.path.isfile(os.path.join(path, name)):
            raise AdapterNotFoundError(f"{path!r} has no {name} ({describe_folder(path)})")
    space = TokenSpace.from_file(os.path.join(path, TOKEN_SPACE_NAME))
    if space.sha256() != config.token_space_sha256:
        raise TokenSpaceError(
            f"{path}: {TOKEN_SPACE_NAME} (sha256 {space.sha256()[:12]}…) differs from the token space in "
            f"{CONFIG_NAME} (sha256 {config.token_space_sha256[:12]}…)"
        )
    where = os.path.join(path, WEIGHTS_NAME)
    header = read_safetensors_header(where)
    tensors = tuple(sorted(k for k in header if k != "__metadata__"))
    hidden = check_row_blocks(
        {k: (header[k]["shape"], header[k]["dtype"] in SAFETENSORS_DTYPES) for k in tensors}, config, where
    )
    return AdapterFolder(path, config, rows_bytes_of_file(where), hidden, tensors)


def _lora_files(config: RowExtensionConfig) -> tuple[str, ...]:
    """The files of the LoRA adapter saved with the rows (``lora/…``), if the adapter has one."""
    if not config.lora_adapter:
        return ()
    return tuple(f"{config.lora_adapter}/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME))


def check_peft_type(peft_type: Any, *, where: str) -> None:
    """Raise `WrongAdapterTypeError` unless ``peft_type`` is ``ROW_EXTENSION``."""
    if str(getattr(peft_type, "value", peft_type)) != PeftType.ROW_EXTENSION.value:
        raise WrongAdapterTypeError(
            f"{where}: peft_type is {peft_type!r}, not 'ROW_EXTENSION': this is not a uti-peft row-extension "
            "adapter (load other PEFT adapters with PEFT directly)"
        )
