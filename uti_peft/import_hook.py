"""Register ``ROW_EXTENSION`` with PEFT as soon as PEFT or transformers is imported, without ``import uti_peft``
importing them.

``import uti_peft`` must make ``PeftModel.from_pretrained(base, adapter)`` (and transformers' own adapter
entry points, `uti_peft._compat`) work, and ``uti-peft --help`` (whose module lives in this package) must not
spend seconds importing torch, transformers and peft. Both hold if registration happens when PEFT or
transformers is imported: neither can load an adapter before it is imported.

`install` therefore registers at once when either is already imported, and otherwise puts a finder on
``sys.meta_path`` that wraps the loaders of ``peft``, ``transformers`` and our own submodules: when an import
of one of them completes and no such import is still running in this thread (a submodule of ours importing
peft is half-initialised until its outermost import finishes), the registration (`_register`) runs, and the
finder removes itself. Nothing else about imports changes: other modules are found and loaded as before.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any, Optional, Sequence


_state = threading.local()  # .depth: imports of watched modules running in this thread
_lock = threading.RLock()
_registered = False


_TRIGGERS = ("peft", "transformers")


def _watched(name: str) -> bool:
    return name in _TRIGGERS or name.startswith("uti_peft.")


def _triggered() -> bool:
    return any(name in sys.modules for name in _TRIGGERS)


class _RegisterWhenPeftIsImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the loader's ``exec_module`` (`_counted`).

    It does not ask the start-up hook's finder (`uti_peft_autoload`), which also finds nothing itself and asks
    the others, this one included: asking each other would never end. That finder's own wrap only imports
    uti_peft, which is imported already whenever this finder is installed.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        if not _watched(fullname):
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None or type(finder).__module__ == "uti_peft_autoload":
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _counted(spec.loader.exec_module)  # this loader instance serves this spec only
        return spec


def _counted(exec_module):
    def wrapper(module) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            exec_module(module)
        finally:
            _state.depth -= 1
        _register_if_ready()

    return wrapper


_FINDER = _RegisterWhenPeftIsImported()


def _register_if_ready() -> None:
    global _registered
    if _registered or getattr(_state, "depth", 0) or not _triggered():
        return
    with _lock:
        if _registered:
            return
        _registered = True  # set first: register() imports our modules, which come back here
        _uninstall()
        try:
            _register()
        except BaseException:
            _registered = False
            raise


def _register() -> None:
    """What ``import uti_peft`` did eagerly before: the method, the model-card writer and the Hub integration."""
    from . import card  # noqa: F401  (registers the model card writer for saved adapters)
    from . import hub
    from . import row_extension  # noqa: F401  (registers the method with PEFT on import)

    hub.install()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if peft or transformers is imported, else as soon as one is (see the module docstring)."""
    with _lock:
        if _registered:
            return
        if not _triggered() and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    _register_if_ready()
