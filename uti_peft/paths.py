"""Local path or Hub repo id? Decided without touching the network (no torch, transformers or peft either).

A value naming an existing local directory is used as such and never sent to the Hub; a value that cannot
be a Hub repo id (``./x``, ``/abs/x``, ``~/x``, ``a/b/c``, a Windows path) and does not exist fails at once,
instead of after the Hub's retries.
"""

from __future__ import annotations

import os
from typing import Optional


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a filesystem path, which a Hub repo id (``name`` or ``org/name``) never is."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")
    )


def hub_repo_id(value: str, option: str) -> str:
    """``value`` if it is a valid Hub repo id, else ValueError naming ``option`` and huggingface_hub's reason."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ValueError(f"{option} {value!r} is not a valid Hub repo id ({' '.join(str(exc).split())})") from None
    return value


def model_source(value: str, option: str) -> str:
    """``value`` if it is a local directory or a valid Hub repo id; otherwise fail now, saying it is neither."""
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise ValueError(f"{option} {value!r} is a file; expected a directory or a Hub repo id")
    if looks_like_path(value):
        raise FileNotFoundError(f"{option} {value!r}: no such directory (and a path is not a Hub repo id)")
    try:
        return hub_repo_id(value, option)
    except ValueError:
        raise FileNotFoundError(
            f"{option} {value!r} is neither an existing directory nor a valid Hub repo id (org/name)"
        ) from None


def portable_base(name: Optional[str]) -> Optional[str]:
    """What an adapter should record as its base: a local directory as an absolute path (``"try/base"`` typed in
    one directory would otherwise be looked up elsewhere, or on the Hub, wherever the adapter is loaded from);
    a Hub id, a missing path or None as given."""
    if not name:
        return name
    local = os.path.expanduser(os.fspath(name))
    return os.path.abspath(local) if os.path.isdir(local) else name


def missing_local_base(name: Optional[str]) -> bool:
    """Whether a recorded base is written as a local path (`looks_like_path`) that does not exist here: loading it
    can only fail, and must fail before any Hub request."""
    return bool(name) and looks_like_path(name) and not os.path.isdir(os.path.expanduser(name))
