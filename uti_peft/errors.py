"""The exceptions of uti-peft. `RowExtensionError` is a `ValueError`, the base of the others, so one
``except ValueError`` (or ``except RowExtensionError``) catches every refusal."""


class RowExtensionError(ValueError):
    """An adapter does not fit the base model (or its own files); the base model was left untouched."""
