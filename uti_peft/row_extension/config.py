"""`RowExtensionConfig`: the PEFT config of a vocabulary-extension adapter.

The adapter is defined by its token space: rows ``[text_vocab_size, vocab_size)`` of the input
embedding (and of the lm_head) are new and trained; rows below are the base model's text rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..adapter_location import locate_adapter, locate_adapter_error
from ..constants import CONFIG_NAME, HEAD_ROW_MODES, INIT_STRATEGIES, TOKEN_SPACE_NAME
from ..errors import TokenSpaceError, WrongAdapterTypeError
from ..paths import looks_like_path, portable_base
from ..token_space import TokenSpace

# Called as ``hook(directory, config)`` after a config is saved beside its rows; layers above the PEFT method (the
# model card) register here, so the method itself depends on none of them.
AFTER_SAVE: list[Callable[[str, "RowExtensionConfig"], None]] = []


def check_lora_adapter_name(name: str) -> None:
    """A LoRA companion's name is a module-dict key and a sub-directory: one plain path component."""
    if not isinstance(name, str) or not name or name == "default" or any(c in name for c in "./\\"):
        raise ValueError(
            f"lora_adapter is {name!r}; expected a plain name (no '.', '/' or backslash, not 'default'), e.g. 'lora'"
        )


@dataclass
class RowExtensionConfig(PeftConfig):
    """Configuration of a row-extension adapter.

    Args:
        token_space: The token space (a `TokenSpace`, its dict, or a path to ``token_space.json``). It is
            stored inside ``adapter_config.json`` with its sha256, so an adapter is self-describing.
        target_modules: Module names of the input embedding and lm_head. ``None`` (default) finds them
            with ``get_input_embeddings()`` / ``get_output_embeddings()``, so any causal LM works.
        init_rows: How new rows start when training from scratch: ``"mean_noise"`` (legacy recipe:
            mean of the text rows + N(0, 1) * std of the text rows * ``init_noise_factor``) or ``"mean"``.
        head_rows: ``"trained"`` (default): the lm_head has its own trained rows (or, on a tied model,
            shares the input rows). ``"mean"``: the adapter carries no head rows; the head's new rows are
            the mean of its text rows (what converted legacy checkpoints without an ``lm_head`` get).
        lora_adapter: Name of a LoRA adapter trained together with the rows (set by `uti_peft.add_lora`). It is
            saved as a standard PEFT LoRA adapter in the sub-directory of that name and loaded with the rows.
        text_vocab_size, vocab_size, pad_token_id, token_space_sha256: derived from the token space;
            when given (e.g. read back from disk) they must agree with it.
    """

    token_space: Optional[Union[dict[str, Any], TokenSpace, str, os.PathLike]] = field(
        default=None, metadata={"help": "The token space (dict, TokenSpace or path to token_space.json)."}
    )
    token_space_sha256: Optional[str] = field(default=None, metadata={"help": "sha256 of the token space."})
    text_vocab_size: Optional[int] = field(default=None, metadata={"help": "Rows kept from the base model."})
    vocab_size: Optional[int] = field(default=None, metadata={"help": "Total rows after extension."})
    pad_token_id: Optional[int] = field(default=None, metadata={"help": "Pad id set on the model config."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Input embedding and lm_head module names; None finds them."}
    )
    init_rows: str = field(default="mean_noise", metadata={"help": f"One of {INIT_STRATEGIES}."})
    init_noise_factor: float = field(default=0.02, metadata={"help": "Noise scale for init_rows='mean_noise'."})
    head_rows: str = field(default="trained", metadata={"help": f"One of {HEAD_ROW_MODES}."})
    lora_adapter: Optional[str] = field(
        default=None, metadata={"help": "Sub-directory (and adapter name) of a LoRA adapter saved with the rows."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ROW_EXTENSION
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if self.token_space is None:
            raise TokenSpaceError("RowExtensionConfig needs a token_space (TokenSpace, dict or path)")
        space = TokenSpace.coerce(self.token_space)
        self.token_space = space.to_dict()
        derived = {
            "token_space_sha256": space.sha256(),
            "text_vocab_size": space.text_vocab_size,
            "vocab_size": space.vocab_size,
            "pad_token_id": space.pad_token_id,
        }
        for name, value in derived.items():
            stored = getattr(self, name)
            if stored is not None and stored != value:
                raise TokenSpaceError(
                    f"adapter config field {name} is {stored!r} but the token space gives {value!r}"
                )
            setattr(self, name, value)
        if self.init_rows not in INIT_STRATEGIES:
            raise ValueError(f"init_rows is {self.init_rows!r}; expected one of {INIT_STRATEGIES}")
        if self.head_rows not in HEAD_ROW_MODES:
            raise ValueError(f"head_rows is {self.head_rows!r}; expected one of {HEAD_ROW_MODES}")
        if self.lora_adapter is not None:
            check_lora_adapter_name(self.lora_adapter)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    @property
    def num_new_rows(self) -> int:
        return self.vocab_size - self.text_vocab_size

    def get_token_space(self) -> TokenSpace:
        return TokenSpace(self.token_space, source="adapter_config.json token_space")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config and remember where it came from, so that the rows can be checked before the
        base model is touched (see `RowExtensionModel`).

        Errors say what to do: a missing directory, repo, revision or ``adapter_config.json`` (`locate_adapter`;
        a local path fails at once, without asking the Hub), another PEFT type, or a ``peft_type`` nobody
        registered.
        """
        name = os.fspath(pretrained_model_name_or_path)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        if os.path.isdir(name) or looks_like_path(name):
            locate_adapter(name, subfolder=subfolder)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as exc:  # PEFT's bare "Can't find 'adapter_config.json' at ...": say which case it is
            if f"Can't find '{CONFIG_NAME}'" not in str(exc):
                raise
            raise locate_adapter_error(name, subfolder=subfolder, **hub_kwargs) or exc from exc
        except KeyError as exc:  # PEFT has no config class for the file's peft_type
            raise WrongAdapterTypeError(
                f"{CONFIG_NAME} of {name!r} has peft_type {exc.args[0]!r}, which no installed PEFT method provides: "
                "upgrade peft, or install and import the package that defines it"
            ) from None
        if not isinstance(config, RowExtensionConfig):  # PEFT returns whatever type the file names
            raise WrongAdapterTypeError(
                f"{name!r} holds a {getattr(config.peft_type, 'value', config.peft_type)} "
                "adapter, not a uti-peft ROW_EXTENSION adapter"
            )
        config.weights_source = (str(pretrained_model_name_or_path), {"subfolder": subfolder, **hub_kwargs})
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and, beside it, the token space as ``token_space.json``; then run the
        `AFTER_SAVE` hooks (`uti_peft.card` registers the one that writes the model card ``README.md``).

        ``PeftModel.save_pretrained`` writes the weights before the config, so the hooks see the whole adapter.
        A base that is a local directory is recorded as an absolute path (`uti_peft.paths.portable_base`), so that
        the adapter still finds it when loaded from another directory.
        """
        self.base_model_name_or_path = portable_base(self.base_model_name_or_path)
        super().save_pretrained(save_directory, **kwargs)
        self.get_token_space().save(os.path.join(save_directory, TOKEN_SPACE_NAME))
        for hook in AFTER_SAVE:
            hook(save_directory, self)


def find_row_extension_adapter(peft_config: Mapping[str, PeftConfig]) -> tuple[str, RowExtensionConfig]:
    """The name and config of the row-extension adapter among a model's adapters (a LoRA may sit beside it)."""
    for name, config in peft_config.items():
        if isinstance(config, RowExtensionConfig):
            return name, config
    raise ValueError("the model carries no row-extension adapter")
