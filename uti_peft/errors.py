"""The exceptions of uti-peft. `RowExtensionError` is a `ValueError` and the base of the others, so one
``except ValueError`` (or ``except RowExtensionError``) catches every refusal; each names what was wrong."""


class RowExtensionError(ValueError):
    """An adapter does not fit the base model (or its own files); the base model was left untouched."""


class TokenSpaceError(RowExtensionError):
    """A token space is malformed or disagrees with something it must match."""


class AdapterNotFoundError(RowExtensionError):
    """No adapter where one was asked for: no such repo, revision, directory or ``adapter_config.json``."""


class WrongAdapterTypeError(RowExtensionError):
    """The adapter is not a row-extension adapter (or names a ``peft_type`` nobody registered)."""


class BaseModelMismatchError(RowExtensionError):
    """The adapter was made for a base of another shape."""


class BaseModelMismatchWarning(UserWarning):
    """The adapter was saved from a base with another name (the shapes fit, the weights may not)."""


class LegacyCheckpointError(RowExtensionError):
    """A legacy checkpoint (or an adapter to export) is unsafe, unreadable or inconsistent."""


class MergeError(RowExtensionError):
    """A merge (`uti_peft.merge`) cannot be made: the base, adapter, tokenizer or output directory does not allow
    it. Nothing was written."""


class ExtractError(RowExtensionError):
    """A vocabulary extension cannot be extracted (`uti_peft.extract`): the source is not one of the base, or its
    token space cannot be found. Nothing was written."""


class UnsupportedVersionError(RowExtensionError):
    """A row-extension adapter needs a transformers or peft internal that the installed version lacks or has
    reshaped. Only our adapters get it: every other adapter goes to the original code. ``versions`` holds the
    installed versions, ``tested`` the tested ranges."""

    def __init__(self, message: str, *, versions: dict[str, str], tested: dict[str, str]) -> None:
        super().__init__(message)
        self.versions = versions
        self.tested = tested


class BaseModelNotFoundError(RowExtensionError):
    """The base an adapter records (``base_model_name_or_path``) is a local path that does not exist here; the
    adapter can still be loaded onto that base given explicitly."""
