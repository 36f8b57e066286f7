"""Registers uti-peft with PEFT the first time peft is imported, in every interpreter of an environment where
uti-peft is installed, so scripts and tools that never ``import uti_peft`` (a notebook, lm-evaluation-harness's
``peft=``, a TRL or accelerate script) load row-extension adapters too.

``uti_peft.pth`` (installed in site-packages) imports this module at start-up. It imports nothing but ``os`` and
``sys`` and only watches two imports:

* when ``peft`` has been imported, it imports ``uti_peft``, which registers the ROW_EXTENSION method (so
  ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work);
* when transformers' adapter integration has been imported (``AutoModelForCausalLM.from_pretrained(adapter)``
  and ``pipeline`` import peft only inside ``load_adapter``), its ``load_adapter`` first imports ``uti_peft``.

``UTI_PEFT_AUTOLOAD=0`` turns it off.
"""

import os
import sys

# = uti_peft.constants.AUTOLOAD_ORIGINAL_ATTRIBUTE, written out: importing uti_peft is what this module defers
ORIGINAL_ATTRIBUTE = "__uti_peft_autoload_original__"


def _import_uti_peft(_module=None) -> None:
    try:
        import uti_peft  # noqa: F401  (registers the method on import)
    except Exception as exc:  # never break the import that triggered it
        import warnings

        warnings.warn(f"uti-peft could not register with PEFT: {exc!r}", stacklevel=2)


def _load_adapter_imports_uti_peft_first(module) -> None:
    mixin = module.PeftAdapterMixin
    original = mixin.__dict__["load_adapter"]
    if "uti_peft" in sys.modules or hasattr(original, ORIGINAL_ATTRIBUTE):
        return

    def load_adapter(self, *args, **kwargs):
        mixin.load_adapter = original
        _import_uti_peft()  # replaces mixin.load_adapter with uti-peft's, which wraps ``original``
        return mixin.load_adapter(self, *args, **kwargs)

    setattr(load_adapter, ORIGINAL_ATTRIBUTE, original)
    mixin.load_adapter = load_adapter


_AFTER_IMPORT = {"peft": _import_uti_peft, "transformers.integrations.peft": _load_adapter_imports_uti_peft_first}


class _AfterImport:
    """A meta-path finder that finds nothing itself: it lets the others find a watched module and runs the
    module's hook once the module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        hook = _AFTER_IMPORT.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            hook(module)

        loader.exec_module = exec_then_hook
        return spec


def install() -> None:
    """Watch for peft and transformers' adapter integration (once per interpreter; honours UTI_PEFT_AUTOLOAD)."""
    if os.environ.get("UTI_PEFT_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        return
    if "peft" in sys.modules:
        _import_uti_peft()
    elif "transformers.integrations.peft" in sys.modules:
        _load_adapter_imports_uti_peft_first(sys.modules["transformers.integrations.peft"])
    sys.meta_path.insert(0, _AfterImport())
