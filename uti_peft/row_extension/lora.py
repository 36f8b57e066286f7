"""Rows + LoRA in one `PeftModel`: a LoRA adapter trained, saved, loaded and merged together with the rows.

A PeftModel holds adapters of one PEFT type (``add_adapter`` refuses to mix types), so the row-extension
tuner hosts the LoRA itself: PEFT's own LoRA tuner (`peft.inject_adapter_in_model`) injects the LoRA
layers into the same model and registers the LoRA config in the same ``peft_config`` dict. Everything else
is PEFT's multi-adapter machinery, unchanged:

* ``save_pretrained(dir)`` writes the rows in ``dir`` and the LoRA in ``dir/<name>/``, a standard PEFT LoRA
  adapter of the row-extended model (loadable by plain PEFT onto a merged model);
* ``PeftModel.from_pretrained(base, dir)`` loads both: the row config names the LoRA
  (`RowExtensionConfig.lora_adapter`) and the tuner loads it right after the rows;
* ``merge_and_unload()`` merges both into a plain model, ``unload()`` removes both;
* ``Trainer``'s checkpoint resume reloads both (it loads every adapter sub-directory it finds).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftConfig, PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTuner, cast_adapter_dtype, check_target_module_exists
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .config import RowExtensionConfig, check_lora_adapter_name, find_row_extension_adapter
from ..constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, PEFT_KEY_PREFIX
from ..errors import RowExtensionError

LORA_ADAPTER_NAME = "lora"
# of peft's EMBEDDING_LAYER_NAMES (the modules save_embedding_layers writes whole), the output one
_HEAD_MODULE_NAMES = ("lm_head",)


def add_lora(
    model: PeftModel, config: LoraConfig, adapter_name: str = LORA_ADAPTER_NAME, autocast_adapter_dtype: bool = True
) -> PeftModel:
    """Add a LoRA adapter to a model that carries a row-extension adapter, so both train and save together.

    The LoRA is trainable unless ``config.inference_mode``; its targets must not include the input embedding
    or the lm_head (those are the rows' modules). As with ``get_peft_model``, ``autocast_adapter_dtype`` keeps
    the LoRA weights of a bf16/fp16 model in float32. Returns ``model`` itself.
    """
    tuner = model.base_model
    if not any(isinstance(c, RowExtensionConfig) for c in getattr(tuner, "peft_config", {}).values()):
        raise RowExtensionError("add_lora needs a PeftModel that carries a row-extension adapter")
    inject_lora(tuner, config, adapter_name)
    cast_adapter_dtype(tuner.model, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    return model


def inject_lora(tuner: BaseTuner, config: LoraConfig, adapter_name: str) -> None:
    """Inject LoRA layers with PEFT's LoRA tuner and register them as the row adapter's companion."""
    check_lora_adapter_name(adapter_name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft.LoraConfig for the LoRA adapter, got {type(config).__name__}")
    row_name, row_config = find_row_extension_adapter(tuner.peft_config)
    if row_name != "default":
        raise RowExtensionError(
            "a LoRA can be added only to the row-extension adapter named 'default': PEFT saves other adapters in "
            "sub-directories, where the LoRA would not be found"
        )
    if row_config.lora_adapter not in (None, adapter_name) or adapter_name in tuner.peft_config:
        present = row_config.lora_adapter or adapter_name
        raise RowExtensionError(f"the model already carries LoRA adapter {present!r}; one LoRA adapter per model")
    _check_lora_targets(tuner.model, config)
    with warnings.catch_warnings():
        # PEFT's documented way to put a second adapter into a model that has a ``peft_config`` dict
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, tuner.model, adapter_name)
    tuner.peft_config[adapter_name] = config
    tuner.model.peft_config = tuner.peft_config
    row_config.lora_adapter = adapter_name


def read_lora(
    source: tuple[str, dict[str, Any]], adapter_name: str, model: nn.Module, device: torch.device
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check the LoRA adapter saved beside the rows (``<adapter>/<adapter_name>/``), without touching
    the model: every tensor must be a LoRA weight of one of the model's modules."""
    path, hub_kwargs = source
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    subfolder = os.path.join(hub_kwargs.pop("subfolder", None) or "", adapter_name)
    where = os.path.join(path, subfolder)
    try:
        config = PeftConfig.from_pretrained(path, subfolder=subfolder, **hub_kwargs)
    except Exception as exc:
        raise RowExtensionError(
            f"the adapter's config names LoRA adapter {adapter_name!r}, but {where!r} cannot be read: {exc}"
        ) from exc
    if not isinstance(config, LoraConfig):
        raise RowExtensionError(f"{where}: adapter_config.json holds a {config.peft_type} adapter, expected LORA")
    try:
        weights = load_peft_weights(path, device=str(device), subfolder=subfolder, **hub_kwargs)
    except Exception as exc:
        raise RowExtensionError(f"cannot read the LoRA weights of {where!r}: {exc}") from exc
    check_lora_weights(weights, model, where)
    return config, weights


def check_lora_weights(weights: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Refuse tensors that are not LoRA weights of ``model``'s modules (e.g. full embedding matrices that
    PEFT's ``save_embedding_layers`` wrote, or LoRA for modules this model does not have)."""
    modules = {name for name, _ in model.named_modules()}
    foreign = []
    for key in weights:
        module_path, is_lora, _ = key.removeprefix(PEFT_KEY_PREFIX).partition(".lora_")
        if not key.startswith(PEFT_KEY_PREFIX) or not is_lora or module_path not in modules:
            foreign.append(key)
    if foreign or not weights:
        raise RowExtensionError(
            f"{where}: the LoRA weights must be lora_* tensors of the model's modules; "
            + (f"found {sorted(foreign)[:5]}{' …' if len(foreign) > 5 else ''}" if foreign else "found none")
        )


def load_lora(
    tuner: BaseTuner, config: LoraConfig, weights: dict[str, torch.Tensor], adapter_name: str, inference_mode: bool
) -> None:
    """Inject the LoRA read by `read_lora` and load its weights (frozen when the rows are loaded for inference).

    Its weights are kept in float32 on a bf16/fp16 base, as ``PeftModel.from_pretrained`` keeps a LoRA by
    default (``autocast_adapter_dtype=True``), so the model equals the LoRA loaded onto a merged model.
    """
    config.inference_mode = inference_mode
    inject_lora(tuner, config, adapter_name)
    cast_adapter_dtype(tuner.model, adapter_name=adapter_name, autocast_adapter_dtype=True)
    # saved keys are relative to the PeftModel ("base_model.model.…"), the tuner's to itself ("model.…")
    relative = {key.removeprefix("base_model."): value for key, value in weights.items()}
    result = set_peft_model_state_dict(tuner, relative, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k and ".lora_" in k]
    if missing or result.unexpected_keys:
        raise RowExtensionError(
            f"LoRA adapter {adapter_name!r} does not match its config: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def _check_lora_targets(model: nn.Module, config: LoraConfig) -> None:
    embedding_modules = {model.get_input_embeddings(), model.get_output_embeddings()}
    for name, module in model.named_modules():
        if module in embedding_modules and (
            check_target_module_exists(config, name) or _in_modules_to_save(config.modules_to_save, name)
        ):
            raise RowExtensionError(
                f"the LoRA config targets {name!r}, the module that holds the new rows; LoRA goes on the other "
                "layers (e.g. the attention and MLP projections)"
            )


def _in_modules_to_save(modules_to_save: Optional[list[str]], name: str) -> bool:
    return any(name == m or name.endswith(f".{m}") for m in modules_to_save or ())


# ---------------------------------------------------------------------- legacy Stage-4 LoRA directories
def read_legacy_lora(
    lora_dir: str, new_rows: dict[str, torch.Tensor], text_vocab_size: int
) -> tuple[LoraConfig, dict]:
    """Read a PEFT LoRA directory that the legacy recipe trained on the resized model, for conversion.

    ``new_rows`` are the checkpoint's rows by on-disk key (`INPUT_ROWS_KEY`, and `OUTPUT_ROWS_KEY` unless the
    head is tied). Full embedding / lm_head matrices that PEFT's ``save_embedding_layers`` may have written
    beside the LoRA are dropped after checking that their new rows equal the checkpoint's rows *of the same
    role* bit for bit (an lm_head matrix against the head rows, an embedding against the input rows; the text
    rows were frozen, so they are the base's); swapped blocks, and any other tensor that is not a LoRA weight,
    are refused.
    """
    where = os.path.join(lora_dir, CONFIG_NAME)
    if not os.path.isfile(where):
        raise RowExtensionError(f"{lora_dir}: not a PEFT adapter directory ({CONFIG_NAME} is missing)")
    config = PeftConfig.from_pretrained(lora_dir)
    if not isinstance(config, LoraConfig):
        raise RowExtensionError(f"{where}: peft_type is {config.peft_type.value!r}, expected 'LORA'")
    try:
        weights = load_peft_weights(lora_dir, device="cpu")  # safetensors, or .bin read with weights_only=True
    except Exception as exc:
        raise RowExtensionError(f"{lora_dir}: cannot read the LoRA weights ({exc})") from exc
    for key in [k for k in weights if ".lora_" not in k]:
        tensor = weights.pop(key)
        head = key.rsplit(".", 2)[-2] in _HEAD_MODULE_NAMES
        role, expected = (OUTPUT_ROWS_KEY, "lm_head") if head and OUTPUT_ROWS_KEY in new_rows else (INPUT_ROWS_KEY,
                                                                                                     "embeddings")
        rows = new_rows[role]
        tail = tensor[text_vocab_size:] if tensor.dim() == 2 else None
        if tail is None or tail.shape != rows.shape or not torch.equal(tail, rows.to(tail.dtype)):
            raise RowExtensionError(
                f"{lora_dir}: {key} {list(tensor.shape)} is not a LoRA weight, nor a full "
                f"{'lm_head' if head else 'embedding'} matrix whose rows {text_vocab_size}.. equal the checkpoint's "
                f"{expected} rows"
            )
    if not weights or any(not k.startswith(PEFT_KEY_PREFIX) for k in weights):
        raise RowExtensionError(f"{lora_dir}: expected LoRA weights saved by PeftModel.save_pretrained, found {sorted(weights)[:5]}")
    return config, weights


def write_lora(directory: str, config: LoraConfig, weights: dict[str, torch.Tensor]) -> None:
    """Write a standard PEFT LoRA adapter directory (config + safetensors weights)."""
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, SAFETENSORS_WEIGHTS_NAME),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------- a saved LoRA merged without a model
@dataclass
class SavedLora:
    """The LoRA companion: its config, its weights per module path and the base's modules (on meta)."""

    name: str
    where: str
    config: LoraConfig
    weights: dict[str, dict[str, torch.Tensor]]  # module path -> {key relative to the model: tensor}
    modules: dict[str, nn.Module]


def read_saved_lora(where: str, name: str, model: nn.Module, stored_shapes: dict[str, list[int]]) -> SavedLora:
    """The LoRA adapter in ``where`` (named ``name``), checked against ``model`` (on the meta device) and the
    base checkpoint's weight shapes (``stored_shapes``, by tensor name), for `merge_lora_weight`."""
    config = PeftConfig.from_pretrained(where)
    if not isinstance(config, LoraConfig):
        raise RowExtensionError(
            f"{where}: adapter_config.json field peft_type is {config.peft_type!r}, expected 'LORA'"
        )
    for field_name in ("lora_bias", "target_parameters"):
        if getattr(config, field_name, None):
            raise RowExtensionError(
                f"{where}: adapter_config.json field {field_name} is set; merging it is not supported"
            )
    weights = load_peft_weights(where, device="cpu")
    check_lora_weights(weights, model, where)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        relative = key.removeprefix(PEFT_KEY_PREFIX)
        grouped.setdefault(relative.partition(".lora_")[0], {})[relative] = tensor
    modules = {}
    for path in grouped:
        module = model.get_submodule(path)
        shape = stored_shapes.get(f"{path}.weight")
        if shape != list(module.weight.shape):
            raise RowExtensionError(
                f"{where}: LoRA targets {path!r}, whose weight the base checkpoint does not hold as "
                f"{list(module.weight.shape)} (found {shape})"
            )
        if module is model.get_input_embeddings() or module is model.get_output_embeddings():
            raise RowExtensionError(f"{where}: LoRA targets {path!r}, the module that holds the new rows")
        modules[path] = module
    return SavedLora(name, where, config, grouped, modules)


def merge_lora_weight(lora: SavedLora, path: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the LoRA of module ``path`` merged, by the very layer PEFT would wrap it in.

    The module is a copy of the base's (its class decides PEFT's layer), holding ``weight``, alone in a holder
    at its own path; PEFT injects and loads the LoRA as `load_lora` does (float32 LoRA weights on
    bf16/fp16 weights, ``autocast_adapter_dtype``) and merges it as ``merge_and_unload`` does."""
    module = copy.deepcopy(lora.modules[path])
    module.weight = nn.Parameter(weight, requires_grad=False)
    if getattr(module, "bias", None) is not None:
        module.bias = None  # a LoRA merge (lora_bias refused) never reads it
    holder, *parents, leaf = [nn.Module(), *path.split(".")]
    parent = holder
    for part in parents:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(leaf, module)
    config = copy.deepcopy(lora.config)
    config.target_modules, config.exclude_modules, config.inference_mode = {path}, None, True
    inject_adapter_in_model(config, holder, lora.name)
    cast_adapter_dtype(holder, adapter_name=lora.name, autocast_adapter_dtype=True)
    result = set_peft_model_state_dict(holder, lora.weights[path], adapter_name=lora.name)
    missing = [k for k in result.missing_keys if f".{lora.name}." in k]
    if missing or result.unexpected_keys:
        raise RowExtensionError(f"{lora.where}: LoRA of {path!r} does not match its config: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
    layer = holder.get_submodule(path)
    layer.merge()
    return layer.get_base_layer().weight.data
