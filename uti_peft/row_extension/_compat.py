"""Everything uti-peft does to PEFT and transformers that they offer no public hook for, in one place.

Each patch says which behaviour it works around and acts only for row-extension adapters (every other adapter
goes to the original code, called with the caller's arguments untouched, even when an internal a patch needs is
missing or reshaped: imports and constructions of peft/transformers internals happen only on our branch, where a
failure is an `UnsupportedVersionError` naming the versions. `install` applies them once, idempotently, skipping a
patch whose target is gone. Tested with the ranges in `versions.CHECKED_WITH`; another version warns once.

* `PeftType` is a closed enum and ``register_peft_method`` refuses names it lacks: the member is added.
* PEFT's ``save_embedding_layers="auto"`` saves the *whole* embedding and lm_head when embeddings are targeted
  or the vocabulary changed; a row-extension adapter is the record of that resize: "auto" means rows only.
* peft 0.21's ``load_peft_weights`` cannot find a cached adapter in a subfolder offline.
* ``PeftModel.push_to_hub`` (inherited from transformers) uploads a generic card; ours is uploaded instead by
  the handler the Hub layer registers (`set_push_handler`).
* transformers' adapter doors (``from_pretrained(adapter)``, ``load_adapter``, ``pipeline``) inject the adapter,
  then load weights by parameter name and *initialise what they did not find*: our rows are stored under
  architecture-independent names and the lm_head's rows may be trained, derived or tied, so they would silently
  stay freshly initialised. ``load_adapter`` goes through the tuner instead, ``save_pretrained`` writes what
  ``PeftModel.save_pretrained`` writes, and adapter-management methods are let past transformers' gate on an
  unreleased peft 0.22. An adapter that records no base fails before any Hub request.
* PEFT's parameter counts and base-model state dict assume adapter weights are separate tensors; ours are a view
  of the base weight's tail: counted once, and the base's own shapes are returned/loaded.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Callable, Optional

import torch
from peft import PeftConfig, inject_adapter_in_model
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from ..constants import (
    AUTOLOAD_ORIGINAL_ATTRIBUTE, INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, PEFT_KEY_PREFIX, PEFT_TYPE_NAME, WEIGHTS_NAME,
)
from ..adapter_location import check_recorded_base
from ..errors import RowExtensionError
from ..memory import file_page_offset, page_aligned_metadata, sort_metadata_entries
from .config import RowExtensionConfig, find_row_extension_adapter
from .layer import RowExtensionLayer
from .lora import write_lora
from .versions import CHECKED_WITH, is_transformers_ge_v5_1_0, unsupported, warn_once_if_untested

__all__ = ["CHECKED_WITH", "carries_row_extension", "install", "set_push_handler"]
_MARK = "__uti_peft_compat__"
_DOWNLOAD_KEYS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


# ---------------------------------------------------------------------- PEFT: the method's type and saving
def add_peft_type_member() -> None:
    """Give the closed ``PeftType`` enum its ``ROW_EXTENSION`` member (``register_peft_method`` needs it)."""
    from peft.utils import PeftType

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


def _rows_only_by_default(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_peft_model_state_dict(model, *args, **kwargs):
        if not carries_row_extension(model):
            return original(model, *args, **kwargs)
        try:
            bound = signature.bind(model, *args, **kwargs)
        except TypeError:
            return original(model, *args, **kwargs)  # PEFT reports the bad call as it would without us
        if bound.arguments.get("save_embedding_layers", "auto") == "auto":
            bound.arguments["save_embedding_layers"] = False
        return original(*bound.args, **bound.kwargs)

    setattr(get_peft_model_state_dict, _MARK, original)
    return get_peft_model_state_dict


def _offline_subfolder_fix(load_peft_weights):
    """PEFT 0.21's ``load_peft_weights`` in offline mode looks for ``<subfolder>/<subfolder>/adapter_model.*``
    (it joins the subfolder into the file name *and* passes ``subfolder=``), so a cached adapter in a
    subfolder never loads offline. Resolve the file from the cache here and hand PEFT its directory."""

    @functools.wraps(load_peft_weights)
    def wrapper(model_id, *args, **kwargs):
        subfolder = kwargs.get("subfolder")
        if not (subfolder and not args and constants.is_offline_mode()
                and not os.path.isdir(os.path.join(model_id, subfolder))
                and _is_cached_row_extension(model_id, kwargs)):
            return load_peft_weights(model_id, *args, **kwargs)
        from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
        from peft.utils.constants import WEIGHTS_NAME as PICKLE_WEIGHTS_NAME

        device, key_mapping = kwargs.get("device"), kwargs.get("key_mapping")
        download = {k: v for k, v in kwargs.items() if k in _DOWNLOAD_KEYS and k != "local_files_only"}
        for name in (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            try:
                found = hf_hub_download(model_id, name, local_files_only=True, **download)
            except LocalEntryNotFoundError:
                continue
            return load_peft_weights(os.path.dirname(found), device=device, key_mapping=key_mapping)
        return load_peft_weights(model_id, *args, **kwargs)

    setattr(wrapper, _MARK, load_peft_weights)
    return wrapper


def _is_cached_row_extension(model_id: str, download_kwargs: dict) -> bool:
    """Whether the offline cache holds a row-extension ``adapter_config.json`` for ``model_id`` (never raises)."""
    kwargs = {k: v for k, v in download_kwargs.items() if k in _DOWNLOAD_KEYS and k != "local_files_only"}
    try:
        return _is_row_extension_file(hf_hub_download(model_id, "adapter_config.json", local_files_only=True, **kwargs))
    except Exception:  # not cached, not a repo id: not ours, PEFT decides
        return False


_push_handler: Optional[Callable[..., Any]] = None


def set_push_handler(handler: Callable[..., Any]) -> None:
    """``handler(model, repo_id, **kwargs)`` pushes a model that carries a row-extension adapter."""
    global _push_handler
    _push_handler = handler


def _push_to_hub(original):
    @functools.wraps(original)
    def push_to_hub(self, *args, **kwargs):
        if _push_handler is None or len(args) > 1 or not carries_row_extension(self):
            return original(self, *args, **kwargs)
        repo_id = args[0] if args else kwargs.pop("repo_id")
        return _push_handler(self, repo_id, **kwargs)

    setattr(push_to_hub, _MARK, original)
    return push_to_hub


# ---------------------------------------------------------------------- which adapters are ours
def _is_row_extension_file(config_file: Optional[str]) -> bool:
    """Whether ``config_file`` is a row-extension ``adapter_config.json``; a file we cannot read is not ours (the
    original code reports it as it would without uti-peft)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (TypeError, OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == PEFT_TYPE_NAME


def carries_row_extension(model: Any) -> bool:
    """Whether ``model`` (a PeftModel or a transformers model with adapters) carries a row-extension adapter."""
    configs = getattr(model, "peft_config", None) or {}
    return any(isinstance(c, RowExtensionConfig) for c in configs.values())


def _download_kwargs(load_config: Any, adapter_kwargs: Optional[dict], kwargs: dict, local_files_only: bool) -> dict:
    """The Hub arguments transformers' ``load_adapter`` would use for the adapter's files."""
    merged = dict(getattr(load_config, "download_kwargs", None) or {})
    merged.update({k: v for k, v in kwargs.items() if k in _DOWNLOAD_KEYS})
    merged.update(adapter_kwargs or {})
    if local_files_only:
        merged["local_files_only"] = True
    return {k: v for k, v in merged.items() if k in _DOWNLOAD_KEYS and v is not None}


# ---------------------------------------------------------------------- transformers' load_adapter
def load_row_extension_adapter(
    model: Any,
    peft_model_id: Optional[str],
    adapter_name: str,
    *,
    peft_config: Optional[RowExtensionConfig] = None,
    adapter_state_dict: Optional[dict] = None,
    is_trainable: bool = False,
    download_kwargs: Optional[dict] = None,
) -> None:
    """What ``model.load_adapter(...)`` does for a row-extension adapter: the tuner reads, checks and patches the
    rows (and loads the adapter's LoRA) exactly as ``PeftModel.from_pretrained`` does."""
    if peft_config is None:
        peft_config = RowExtensionConfig.from_pretrained(peft_model_id, **(download_kwargs or {}))
    elif adapter_state_dict is None and getattr(peft_config, "weights_source", None) is None:
        raise RowExtensionError(
            "load_adapter(peft_config=...) with a row-extension config needs its rows: pass adapter_state_dict= or "
            "load the adapter by path or Hub id"
        )
    peft_config.inference_mode = not is_trainable
    inject_adapter_in_model(peft_config, model, adapter_name, state_dict=adapter_state_dict)
    model._hf_peft_config_loaded = True
    if peft_config.inference_mode:
        model.eval()
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.requires_grad_(False)


def _load_adapter(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        arguments = _row_extension_load(signature, self, args, kwargs)
        if arguments is None:
            return original(self, *args, **kwargs)
        return _load_ours(self, arguments)

    setattr(load_adapter, _MARK, original)
    return load_adapter


def _row_extension_load(signature: inspect.Signature, model: Any, args: tuple, kwargs: dict) -> Optional[dict]:
    """The arguments of a ``load_adapter`` call by name when it loads a row-extension adapter, else None. Never
    raises: whatever it cannot decide (arguments that do not bind, an unreadable config) is left to the original."""
    try:
        bound = signature.bind(model, *args, **kwargs)
    except TypeError:
        return None
    arguments = dict(bound.arguments)  # extra keyword arguments stay under "kwargs"
    peft_config = arguments.get("peft_config")
    if isinstance(peft_config, RowExtensionConfig):
        return arguments
    if isinstance(peft_config, dict):
        return arguments if peft_config.get("peft_type") == PEFT_TYPE_NAME else None
    load_config = arguments.get("load_config")
    model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
    if peft_config is not None or model_id is None:
        return None
    try:
        download = _download_kwargs(load_config, arguments.get("adapter_kwargs"), arguments.get("kwargs") or {},
                                    bool(arguments.get("local_files_only")))
        ours = _is_row_extension_file(_adapter_config_file(model_id, download))
    except Exception:  # the original finds (or reports) the adapter as it would without uti-peft
        return None
    return arguments if ours else None


def _adapter_config_file(model_id: Any, download: dict) -> Optional[str]:
    """The adapter's ``adapter_config.json`` as transformers finds it; our own lookup (a local folder, else the
    Hub) where transformers no longer exports ``find_adapter_config_file``, so our adapters are still recognised."""
    try:
        from transformers.utils import find_adapter_config_file
    except ImportError:
        local = os.path.join(os.fspath(model_id), download.get("subfolder") or "", "adapter_config.json")
        if os.path.isfile(local):
            return local
        return hf_hub_download(os.fspath(model_id), "adapter_config.json", **download)
    return find_adapter_config_file(model_id, **download)


def _load_ours(model: Any, arguments: dict) -> Any:
    """``load_adapter`` for a row-extension adapter; returns the empty load report transformers expects."""
    load_config = arguments.get("load_config")
    peft_model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
    peft_config = arguments.get("peft_config")
    if isinstance(peft_config, dict):
        peft_config = PeftConfig.from_peft_type(**peft_config)
    adapter_name = arguments.get("adapter_name") or "default"
    if arguments.get("hotswap") is True:
        raise RowExtensionError("hotswap=True: a row-extension adapter cannot be hot-swapped (it resizes the model)")
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in model.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    report = _empty_load_report()  # before the model changes: a version failure leaves it untouched
    download = _download_kwargs(load_config, arguments.get("adapter_kwargs"), arguments.get("kwargs") or {},
                                bool(arguments.get("local_files_only")))
    load_row_extension_adapter(model, peft_model_id, adapter_name, peft_config=peft_config,
                               adapter_state_dict=arguments.get("adapter_state_dict"),
                               is_trainable=bool(arguments.get("is_trainable")), download_kwargs=download)
    return report


def _empty_load_report() -> Any:
    """transformers' ``LoadStateDictInfo`` with every field empty, built by field name: the class moved in 5.1
    (from ``modeling_utils``) and its fields changed in 5.1 and 5.16."""
    try:
        if is_transformers_ge_v5_1_0:
            from transformers.utils.loading_report import LoadStateDictInfo
        else:
            from transformers.modeling_utils import LoadStateDictInfo
        return LoadStateDictInfo(**{f.name: _empty_value(f.type) for f in dataclasses.fields(LoadStateDictInfo)})
    except (ImportError, AttributeError, TypeError) as error:
        raise unsupported("transformers' load report (LoadStateDictInfo) for load_adapter", error) from error


def _empty_value(annotation: Any) -> Any:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    kind = re.match(r"\W*(?:class ')?(\w+)", text)
    empties = {"set": set, "list": list, "dict": dict, "tuple": tuple}
    return None if "None" in text or kind is None else empties.get(kind.group(1), lambda: None)()


# ---------------------------------------------------------------------- transformers' save_pretrained
def save_row_extension_adapter(model: Any, save_directory: str | os.PathLike, state_dict: Optional[dict] = None) -> None:
    """Write what ``PeftModel.save_pretrained`` writes for the model's row-extension adapter (rows only, config,
    token space, card) and its LoRA in ``<adapter>/<lora name>/``, for a transformers model loaded or fitted
    with one. Files are written in a temporary directory beside the target and moved in at the end."""
    from peft.utils import get_peft_model_state_dict

    name, config = find_row_extension_adapter(model.peft_config)
    rows = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name, save_embedding_layers=False)
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".uti-peft-save-") as tmp:
        rows = {k: v.contiguous() for k, v in rows.items()}
        save_file(rows, os.path.join(tmp, WEIGHTS_NAME), metadata=rows_file_metadata(rows, {"format": "pt"}))
        sort_metadata_entries(os.path.join(tmp, WEIGHTS_NAME))
        config.save_pretrained(tmp)
        if config.lora_adapter:
            lora = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=config.lora_adapter)
            write_lora(os.path.join(tmp, config.lora_adapter), model.peft_config[config.lora_adapter],
                       {PEFT_KEY_PREFIX + k: v for k, v in lora.items()})
        for entry in os.listdir(tmp):
            target = os.path.join(save_directory, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, entry), target)


def rows_file_metadata(rows: dict[str, torch.Tensor], metadata: Optional[dict[str, str]]) -> dict[str, str]:
    """The metadata to save an adapter's row blocks with: ``metadata``, padded so that the head's rows (on a tied
    base the embedding's, which the head shares) sit in the file at the offset within a page they have in memory,
    which is the base checkpoint's where the head maps it: loading onto that base then maps them from the file
    instead of writing them (`uti_peft.memory.page_aligned_metadata`)."""
    anchor = OUTPUT_ROWS_KEY if OUTPUT_ROWS_KEY in rows else INPUT_ROWS_KEY
    return page_aligned_metadata(rows, metadata or {}, anchor, file_page_offset(rows[anchor]) if anchor in rows else None)


def _page_aligned_rows(original):
    """PEFT's ``save_pretrained`` writes with safetensors' ``save_file``. A row-extension adapter's row blocks (no
    other adapter has these tensor names) get `rows_file_metadata` and are written to a temporary file that then
    replaces the target: a model that loaded the old file keeps mapping its bytes (the file's inode), where
    rewriting it in place would change that model's rows under it; its metadata entries are sorted
    (`uti_peft.memory.sort_metadata_entries`). Every other file is written as without us."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_file(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        tensors = bound.arguments.get("tensors")
        if not (isinstance(tensors, dict) and tensors and set(tensors) <= {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}):
            return original(*bound.args, **bound.kwargs)
        bound.arguments["metadata"] = rows_file_metadata(tensors, bound.arguments.get("metadata"))
        target = os.fspath(bound.arguments["filename"])
        # created by safetensors itself, so with the permissions any file it writes gets
        bound.arguments["filename"] = os.path.join(os.path.dirname(target), f".uti-peft-{uuid.uuid4().hex}.safetensors")
        try:
            original(*bound.args, **bound.kwargs)
            sort_metadata_entries(bound.arguments["filename"])
            os.replace(bound.arguments["filename"], target)
        finally:
            if os.path.exists(bound.arguments["filename"]):
                os.remove(bound.arguments["filename"])

    setattr(save_file, _MARK, original)
    return save_file


def _save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        if not (getattr(self, "_hf_peft_config_loaded", False) and carries_row_extension(self)):
            return original(self, *args, **kwargs)
        save_directory = args[0] if args else kwargs["save_directory"]
        is_main_process = args[1] if len(args) > 1 else kwargs.get("is_main_process", True)
        if kwargs.get("push_to_hub"):
            raise RowExtensionError(
                "save_pretrained(push_to_hub=True) of a model with a row-extension adapter: save it to a directory "
                "and push that with `uti-peft push`"
            )
        if is_main_process:  # Trainer passes the (gathered) state dict
            save_row_extension_adapter(self, save_directory, state_dict=kwargs.get("state_dict"))

    setattr(save_pretrained, _MARK, original)
    return save_pretrained


# ---------------------------------------------------------------------- transformers' adapter management
# transformers 5.24 gates its adapter-management methods (active_adapters, enable/disable_adapters,
# get_adapter_state_dict, ...) on peft >= 0.22 (its MIN_PEFT_VERSION), which is not released; what they call exists
# in peft 0.21. For models that carry a row-extension adapter the gate is opened, so they behave as through a
# PeftModel; for any other model transformers' own check runs. `install` applies it only while the installed peft
# is below transformers' MIN_PEFT_VERSION (`_peft_below_transformers_minimum`).
_GATE_OPEN: contextvars.ContextVar[bool] = contextvars.ContextVar("uti_peft_peft_gate_open", default=False)
_GATED_METHODS = ("add_adapter", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
                  "get_adapter_state_dict", "delete_adapter")


def _version_gate(original):
    @functools.wraps(original)
    def check_peft_version(*args, **kwargs):
        if not _GATE_OPEN.get():
            return original(*args, **kwargs)

    setattr(check_peft_version, _MARK, original)
    return check_peft_version


def _gate_opened_for_ours(original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        ours = carries_row_extension(self) or any(isinstance(a, RowExtensionConfig) for a in (*args, *kwargs.values()))
        token = _GATE_OPEN.set(ours)
        try:
            return original(self, *args, **kwargs)
        finally:
            _GATE_OPEN.reset(token)

    setattr(method, _MARK, original)
    return method


# ---------------------------------------------------------------------- an adapter that names no base
def _no_base_error(adapter: Any) -> RowExtensionError:
    return RowExtensionError(
        f"{os.fspath(adapter)!r}: adapter_config.json records no base_model_name_or_path (the adapter was saved "
        "from a model built in memory), so the base cannot be found from the adapter alone. Load the base and "
        f"pass it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {os.fspath(adapter)!r})"
    )


def _base_required(original):
    """transformers' ``from_pretrained(adapter)`` (the auto classes and ``maybe_load_adapters``) swaps the adapter
    path for the base it records; a row-extension adapter that records none fails here, before any request."""

    @functools.wraps(original)
    def find_adapter_config_file(model_id, *args, **kwargs):
        found = original(model_id, *args, **kwargs)
        if _is_row_extension_file(found) and not os.path.isfile(os.path.join(os.fspath(model_id), "config.json")):
            # a row-extension adapter on its own (not embedded in a model's folder) must name its base
            with open(found, encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
            if not base:
                raise _no_base_error(model_id)
            check_recorded_base(model_id, base)  # a moved local base: fail now, not after the Hub's retries
        return found

    setattr(find_adapter_config_file, _MARK, original)
    return find_adapter_config_file


def _auto_peft_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        if args:
            ours, base = _row_extension_base(args[0], kwargs)
            if ours and not base:
                raise _no_base_error(args[0])
            if ours:
                check_recorded_base(args[0], base)  # a moved local base: fail now, not after the Hub's retries
        return original(cls, *args, **kwargs)

    setattr(from_pretrained, _MARK, original)
    return from_pretrained


def _row_extension_base(model_id: Any, kwargs: dict) -> tuple[bool, Optional[str]]:
    """Whether ``model_id`` holds a row-extension adapter, and the base it records (never raises: PEFT then
    decides)."""
    config = kwargs.get("config")
    try:
        if config is None:
            local = os.path.join(os.fspath(model_id), kwargs.get("subfolder") or "", "adapter_config.json")
            if os.path.isfile(local):
                found = local
            else:
                download = {k: v for k, v in kwargs.items() if k in _DOWNLOAD_KEYS}
                found = hf_hub_download(os.fspath(model_id), "adapter_config.json", **download)
            if not _is_row_extension_file(found):
                return False, None
            with open(found, encoding="utf-8") as f:
                return True, json.load(f).get("base_model_name_or_path")
    except Exception:
        return False, None
    if isinstance(config, RowExtensionConfig):
        return True, config.base_model_name_or_path
    return False, None


# ---------------------------------------------------------------------- PEFT's parameter counts
def _count_rows_once(original):
    @functools.wraps(original)
    def get_nb_trainable_parameters(self, *args, **kwargs):
        if not carries_row_extension(self):
            return original(self, *args, **kwargs)
        trainable, total = original(self, *args, **kwargs)
        # rows kept in the tail of the base weight are that weight's elements too: count them once
        shared = sum(
            module.rows(name).numel()
            for module in self.modules()
            if isinstance(module, RowExtensionLayer) and module.tied_to is None
            for name in module.text_vocab_size
            if module.rows_share_base_storage(name)
        )
        return trainable, total - shared

    setattr(get_nb_trainable_parameters, _MARK, original)
    return get_nb_trainable_parameters


# ---------------------------------------------------------------------- PEFT's base-model state dict
def _base_state_dict(original):
    @functools.wraps(original)
    def get_base_model_state_dict(model, *args, **kwargs):
        if not carries_row_extension(model):
            return original(model, *args, **kwargs)
        state = original(model, *args, **kwargs)
        originals: dict[int, torch.Tensor] = {}  # one tensor per owner, as a tied pair shares one
        for key, owner in _row_layers_by_base_key(model).items():
            state[key] = originals.setdefault(id(owner), owner.original_base_weight())
        return state

    setattr(get_base_model_state_dict, _MARK, original)
    return get_base_model_state_dict


def _set_base_state_dict(original):
    @functools.wraps(original)
    def set_base_model_state_dict(model, *args, **kwargs):
        if not carries_row_extension(model):
            return original(model, *args, **kwargs)
        return _set_ours(original, model, *args, **kwargs)

    setattr(set_base_model_state_dict, _MARK, original)
    return set_base_model_state_dict


def _set_ours(original, model: Any, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """``set_base_model_state_dict`` for a model carrying a row-extension adapter: the row layers' weights are set
    to the base's own shapes, the rest goes to PEFT."""
    layers = _row_layers_by_base_key(model)
    state_dict = dict(state_dict)
    weights = {key: state_dict.pop(key) for key in layers if key in state_dict}
    result = original(model, state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in weights]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(
            f"Error(s) in loading state_dict: missing {missing}, unexpected {list(result.unexpected_keys)}"
        )
    loaded: set[int] = set()
    for key, owner in layers.items():
        if key in weights and id(owner) not in loaded:
            owner.load_original_base_weight(weights[key])
            loaded.add(id(owner))
    return type(result)(missing_keys=missing, unexpected_keys=result.unexpected_keys)


def _row_layers_by_base_key(model: Any) -> dict[str, RowExtensionLayer]:
    """The base model's own key of each row-extension layer's weight (``lm_head.weight``), mapped to the layer that
    owns the weight (a tied lm_head's is the input embedding's)."""
    return {
        f"{name}.weight": module.tied_to or module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, RowExtensionLayer)
    }


# ---------------------------------------------------------------------- installing
# patches whose target this peft/transformers lacks ("owner.attribute"): skipped, never an error at import time
SKIPPED: list[str] = []


def _patch(owner: Any, attribute: str, wrapper_factory, *, classmethod_: bool = False) -> None:
    current = (owner.__dict__.get(attribute) if classmethod_ else getattr(owner, attribute, None))  # may be inherited
    function = getattr(current, "__func__", None) if classmethod_ else current
    if not callable(function):
        SKIPPED.append(f"{getattr(owner, '__qualname__', owner)}.{attribute}")
        return
    # uti_peft_autoload's stand-in for load_adapter, which imported us: wrap what it stands in for
    function = getattr(function, AUTOLOAD_ORIGINAL_ATTRIBUTE, function)
    if hasattr(function, _MARK):
        return
    wrapped = wrapper_factory(function)
    setattr(owner, attribute, classmethod(wrapped) if classmethod_ else wrapped)


def _rebind(module_prefix: str, name: str, wrapper_factory) -> None:
    """Replace the function ``name`` in every loaded module under ``module_prefix`` that holds it."""
    import sys

    modules = [m for n, m in list(sys.modules.items()) if n == module_prefix or n.startswith(module_prefix + ".")]
    originals = {getattr(m, name) for m in modules if callable(getattr(m, name, None))}
    for original in originals:
        if hasattr(original, _MARK):
            continue
        wrapped = wrapper_factory(original)
        for module in modules:
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)


def _module(name: str) -> Any:
    """The module ``name``, or None when this version has no such module (its patches are then skipped)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        SKIPPED.append(name)
        return None


def _peft_below_transformers_minimum(hf_peft: Any) -> bool:
    """Named flag for the adapter-management gate: transformers asks for a newer peft than the installed one."""
    from packaging.version import InvalidVersion, Version

    from .versions import PEFT

    try:
        return Version(str(getattr(hf_peft, "MIN_PEFT_VERSION", "0"))) > PEFT
    except InvalidVersion:
        return False


def install() -> None:
    """Idempotently apply every patch above (called when the method registers with PEFT). A target this version
    lacks is skipped (recorded in `SKIPPED`): installing never fails for other adapters' sake."""
    peft_model, peft_auto = _module("peft.peft_model"), _module("peft.auto")
    hf_peft, modeling_utils = _module("transformers.integrations.peft"), _module("transformers.modeling_utils")
    _module("transformers.models.auto.auto_factory")  # loaded lazily by transformers; rebound below

    warn_once_if_untested()
    _rebind("peft", "get_peft_model_state_dict", _rows_only_by_default)
    _rebind("peft", "safe_save_file", _page_aligned_rows)
    _rebind("peft", "load_peft_weights", _offline_subfolder_fix)
    _rebind("uti_peft", "load_peft_weights", _offline_subfolder_fix)
    if peft_model is not None:
        _patch(peft_model.PeftModel, "push_to_hub", _push_to_hub)
        _patch(peft_model.PeftModel, "get_nb_trainable_parameters", _count_rows_once)
    if peft_auto is not None and hasattr(peft_auto, "_BaseAutoPeftModel"):
        _patch(peft_auto._BaseAutoPeftModel, "from_pretrained", _auto_peft_from_pretrained, classmethod_=True)
    if hf_peft is not None and hasattr(hf_peft, "PeftAdapterMixin"):
        _patch(hf_peft.PeftAdapterMixin, "load_adapter", _load_adapter)
        if _peft_below_transformers_minimum(hf_peft):
            for name in _GATED_METHODS:
                _patch(hf_peft.PeftAdapterMixin, name, _gate_opened_for_ours)
            _rebind("transformers.integrations.peft", "check_peft_version", _version_gate)
    if modeling_utils is not None:
        _patch(modeling_utils.PreTrainedModel, "save_pretrained", _save_pretrained)
    for module in ("transformers.models.auto.auto_factory", "transformers.integrations.peft"):
        _rebind(module, "find_adapter_config_file", _base_required)
    _rebind("peft", "get_base_model_state_dict", _base_state_dict)
    _rebind("peft", "set_base_model_state_dict", _set_base_state_dict)
