"""Registers uti-peft with PEFT and transformers when they are first used — the one import hook of uti-peft.

It serves two callers and imports nothing but the standard library:

* ``uti_peft.pth`` (installed in site-packages) calls `install` at interpreter start-up, so scripts and tools
  that never ``import uti_peft`` (a notebook, lm-evaluation-harness's ``peft=``, a TRL or accelerate script)
  load row-extension adapters too. ``UTI_PEFT_AUTOLOAD=0`` turns this off.
* ``import uti_peft`` calls `install` too: the package imports neither torch, transformers nor peft itself
  (``uti-peft --help`` stays fast), and registration still happens before PEFT can load an adapter.

What it watches:

* when ``peft`` has been imported, `register` runs (the method, the model-card writer, the Hub integration) —
  at once if peft is already imported;
* when transformers' adapter integration has been imported, its ``load_adapter`` first runs `register`
  (``AutoModelForCausalLM.from_pretrained(adapter)`` and ``pipeline`` import peft only inside it), so a program
  that uses transformers without adapters never pays for importing peft;
* registration waits until no import of a ``uti_peft`` module is still running in this thread: a module of
  ours that imports peft is half-initialised until its own import ends.

Registering from here never breaks the program that imported peft: if it fails (a peft or transformers version
that lacks something uti-peft needs), one warning says so, peft and transformers work as without uti-peft, and
only row-extension adapters fail to load (``import uti_peft.row_extension`` raises the error itself).
"""

import os
import sys
import threading
import warnings

# = uti_peft.constants.AUTOLOAD_ORIGINAL_ATTRIBUTE, written out: importing uti_peft is what this module defers
ORIGINAL_ATTRIBUTE = "__uti_peft_autoload_original__"
_TRANSFORMERS_ADAPTERS = "transformers.integrations.peft"

_state = threading.local()  # .depth: imports of uti_peft modules running in this thread
_lock = threading.RLock()
_registered = False
_failed = False  # registering from the hook failed once: warned, not retried


def register() -> None:
    """Register the ROW_EXTENSION method and its integrations (once; what ``import uti_peft`` promises)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True  # first: the imports below come back through the finder
        try:
            # the method registers itself; the card and Hub modules register their save hook and push handler
            from uti_peft import card, hub, row_extension  # noqa: F401
        except BaseException:
            _registered = False
            raise


def _register_quietly() -> None:
    """`register`, from the hook: a failure warns once and leaves other adapters to peft and transformers."""
    global _failed
    try:
        register()
    except Exception as error:  # we live in other people's processes: never break their import of peft
        if not _failed:
            _failed = True
            warnings.warn(
                f"uti-peft could not register the ROW_EXTENSION method ({type(error).__name__}: {error}); other "
                "adapters are unaffected, row-extension adapters will not load here",
                stacklevel=2,
            )


def _peft_imported() -> bool:
    """peft is imported and its import has finished (transformers, which peft imports, comes back here first)."""
    peft = sys.modules.get("peft")
    return peft is not None and not getattr(getattr(peft, "__spec__", None), "_initializing", False)


def _register_when_ready(peft_just_executed: bool = False) -> None:
    if not (_registered or _failed) and not getattr(_state, "depth", 0) and (peft_just_executed or _peft_imported()):
        _register_quietly()


def _load_adapter_registers_first(module) -> None:
    mixin = module.PeftAdapterMixin
    original = mixin.__dict__["load_adapter"]
    if _registered or hasattr(original, ORIGINAL_ATTRIBUTE):
        return

    def load_adapter(self, *args, **kwargs):
        mixin.load_adapter = original
        _register_quietly()  # replaces mixin.load_adapter with uti-peft's, which wraps ``original``
        return mixin.load_adapter(self, *args, **kwargs)

    setattr(load_adapter, ORIGINAL_ATTRIBUTE, original)
    mixin.load_adapter = load_adapter


def _ours(name: str) -> bool:
    return name == "uti_peft" or name.startswith("uti_peft.")


class _AfterImport:
    """A meta-path finder that finds nothing itself: it lets the others find a watched module and wraps the loader
    so that, once the module has executed, its hook runs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ("peft", _TRANSFORMERS_ADAPTERS) and not _ours(fullname):
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _then_hook(fullname, spec.loader.exec_module)  # this loader serves this spec
        return spec


def _then_hook(name: str, exec_module):
    def exec_then_hook(module) -> None:
        ours = _ours(name)
        if ours:
            _state.depth = getattr(_state, "depth", 0) + 1
        try:
            exec_module(module)
        finally:
            if ours:
                _state.depth -= 1
        if name == _TRANSFORMERS_ADAPTERS:
            _load_adapter_registers_first(module)
        _register_when_ready(peft_just_executed=name == "peft")

    return exec_then_hook


def install(*, from_pth: bool = False) -> None:
    """Watch for peft and transformers' adapter integration (once per interpreter), registering at once if peft
    is already imported. From ``uti_peft.pth`` it honours ``UTI_PEFT_AUTOLOAD=0``."""
    if from_pth and os.environ.get("UTI_PEFT_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    with _lock:
        if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport())
    if _TRANSFORMERS_ADAPTERS in sys.modules:
        _load_adapter_registers_first(sys.modules[_TRANSFORMERS_ADAPTERS])
    _register_when_ready()
