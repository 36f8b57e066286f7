"""`RowExtensionModel`: the PEFT tuner that resizes and patches a causal LM's embeddings.

Everything that can go wrong (shapes, row counts, a missing or truncated adapter file) is checked
before the base model is touched; then the input embedding and the lm_head are wrapped in
row-extension layers and the model config gets the new ``vocab_size`` and ``pad_token_id``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import load_peft_weights
from torch import nn

from ..constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, PEFT_KEY_PREFIX, WEIGHTS_NAME
from ..errors import RowExtensionError
from .base_check import check_base_model
from .config import RowExtensionConfig
from .layer import (
    RowExtensionEmbedding,
    RowExtensionLayer,
    RowExtensionLinear,
    init_rows,
    mean_rows,
    sync_size_attributes,
)
from .lora import load_lora, read_lora
from .saved_rows import check_row_blocks
from .zero3 import full_shape, gathered

# on-disk key of each layer role's parameter container
_CANONICAL_KEYS = {
    RowExtensionEmbedding.adapter_layer_names[0]: INPUT_ROWS_KEY,
    RowExtensionLinear.adapter_layer_names[0]: OUTPUT_ROWS_KEY,
}


@dataclass
class _Plan:
    """What injection will do, fully decided (and validated) before any module changes."""

    input_module: nn.Module
    output_module: Optional[nn.Module]
    tied: bool
    input_rows: torch.Tensor
    output_rows: Optional[torch.Tensor]  # None: tied, or no head
    output_trained: bool  # False: the head's rows are derived (mean of its text rows), not trained
    lora: Optional[tuple]  # (LoraConfig, weights) of the LoRA saved with the rows, read by `uti_peft.row_extension.lora.read_lora`
    rows_owned: bool  # the rows are tensors injection made (read or initialised), not a caller's: kept without a copy


class RowExtensionModel(BaseTuner):
    """Tuner for `RowExtensionConfig`; see `uti_peft.row_extension.layer` for how the rows live in the base weights."""

    prefix: str = "row_extension_"
    tuner_layer_cls = RowExtensionLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ config / targets
    def _prepare_adapter_config(self, peft_config: RowExtensionConfig, model_config: dict) -> RowExtensionConfig:
        if peft_config.target_modules is None:
            names = [_module_name(self.model, m) for m in _embedding_modules(self.model) if m is not None]
            peft_config.target_modules = names
        return peft_config

    def _check_tied_modules(self, model: nn.Module, peft_config: RowExtensionConfig) -> None:
        """Tied embeddings are handled by `RowExtensionLinear(tied_to=...)`, nothing to warn about."""

    def _get_tied_target_modules(self, model: nn.Module) -> list[str]:
        return []

    def _check_tied_module_exists(self, peft_config: RowExtensionConfig, key: str) -> bool:
        """A tied lm_head is created after the other targets (PEFT's order for tied modules): it needs the input
        embedding's layer to exist first. PEFT asks this of every module of the model, so the answer is the plan's."""
        plan: _Plan = self._plan
        return plan.tied and self.model.get_submodule(key) is plan.output_module

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        others = {n: c for n, c in self.peft_config.items() if n != adapter_name and isinstance(c, RowExtensionConfig)}
        _check_beside(config, adapter_name, others)
        copied = next((name for name, other in others.items() if other is config), None)
        if copied is not None and state_dict is None:
            # the very config of an adapter already here (TRL's reference adapter: ``add_adapter("ref", config)``):
            # the new adapter starts as a copy of that adapter's current rows, not from new ones
            state_dict = self._current_rows(copied)
        # ``state_dict`` (transformers' ``load_adapter(adapter_state_dict=...)``) holds the rows to load; PEFT would
        # use its keys to pick targets, which ours are not named after, so it is not passed on.
        # under ZeRO-3 zero.Init the embeddings are partitioned: planning reads their full values (new rows are drawn
        # from their statistics), then lets them go before the layers change them
        with gathered([_base_weight(m) for m in _embedding_modules(model) if m is not None]):
            self._plan = plan = _plan_injection(model, config, state_dict)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            del self._plan
        if not others:
            text_config = model.config.get_text_config()
            self._original_config = (text_config.vocab_size, model.config.pad_token_id)
            text_config.vocab_size = config.vocab_size
            model.config.pad_token_id = config.pad_token_id
        if plan.lora is not None:
            load_lora(self, *plan.lora, config.lora_adapter, inference_mode=config.inference_mode)

    def _create_and_replace(
        self,
        peft_config: RowExtensionConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        plan: _Plan = self._plan
        text_vocab_size = peft_config.text_vocab_size
        keep_reference = not peft_config.inference_mode  # the rows disabling falls back to (see enable_adapters)
        if target is plan.input_module:
            # a tied lm_head needs the full-width matrix; an untied embedding keeps its rows apart (no copy)
            rows, kwargs = plan.input_rows, {"in_place": plan.tied, "copy": not plan.rows_owned}
        elif target is plan.output_module and plan.tied:
            rows, kwargs = plan.input_rows, {}
        elif target is plan.output_module:
            rows, kwargs = plan.output_rows, {"trainable": plan.output_trained}
        else:
            raise RowExtensionError(
                f"target module {current_key!r} is neither the input embedding nor the lm_head of the model"
            )
        if isinstance(target, RowExtensionLayer):  # an adapter beside those already there
            target.update_layer(adapter_name, text_vocab_size, rows, keep_reference=keep_reference, **kwargs)
            return
        if target is plan.output_module and plan.tied:
            new_module = RowExtensionLinear(target, adapter_name, tied_to=self.model.get_input_embeddings())
        else:
            new_module = (RowExtensionEmbedding if target is plan.input_module else RowExtensionLinear)(target, adapter_name)
        new_module.update_layer(adapter_name, text_vocab_size, rows, keep_reference=keep_reference, **kwargs)
        self._replace_module(parent, target_name, new_module, target)

    def _current_rows(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """An adapter's trained rows under their on-disk names, detached (what its saved file would hold)."""
        return {
            _CANONICAL_KEYS[module.adapter_layer_names[0]]: module.trained_rows[adapter_name].detach()
            for module in self.model.modules()
            if isinstance(module, RowExtensionLayer) and adapter_name in module.trained_rows
        }

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Deliberately a no-op: the rows live inside the base weight and share its dtype, which is what makes
        a bf16 model bit-identical to the legacy-patched one (PEFT would upcast them to float32)."""

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """Refused: row-extension rows replace base rows rather than adding a weighted delta, so there is nothing to
        combine."""
        raise RowExtensionError(
            "add_weighted_adapter is not supported for row-extension adapters: their rows replace the base's rows "
            "instead of adding a delta that could be weighted"
        )

    # ------------------------------------------------------------------ unload / delete
    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        modules = [m.get_base_layer() if isinstance(m, RowExtensionLayer) else m for m in _embedding_modules(self.model)]
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        if not merge:
            self._restore_config(model)
        for module in modules:
            if module is not None:
                sync_size_attributes(module)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        """Deleting a row-extension adapter passes the weight's tail to the next one; the last gives the base its rows
        (and config) back."""
        super().delete_adapter(adapter_name)
        for module in _embedding_modules(self.model):
            if module is not None:
                sync_size_attributes(module.get_base_layer() if isinstance(module, RowExtensionLayer) else module)
        if not any(isinstance(c, RowExtensionConfig) for c in self.peft_config.values()):
            self._restore_config(self.model)

    def _restore_config(self, model: nn.Module) -> None:
        vocab_size, pad_token_id = self._original_config
        model.config.get_text_config().vocab_size = vocab_size
        model.config.pad_token_id = pad_token_id

    # ------------------------------------------------------------------ on-disk names
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Rows are saved under architecture-independent names (``input_embeddings.new_rows``, …), so an
        adapter file can be written or inspected without knowing the model's module paths."""
        for attr, canonical in _CANONICAL_KEYS.items():
            if key.endswith(f"{attr}.{adapter_name}"):
                return canonical
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # On a tied model the one shared matrix takes the head rows when both are present, as the legacy loader
        # did (its lm_head copy landed last).
        tied_targets = any(
            isinstance(m, RowExtensionLinear) and m.tied_to is not None for m in model.modules()
        )
        if tied_targets and OUTPUT_ROWS_KEY in state_dict:
            state_dict = dict(state_dict)
            state_dict[INPUT_ROWS_KEY] = state_dict.pop(OUTPUT_ROWS_KEY)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


# ---------------------------------------------------------------------- planning (no side effects)
def _embedding_modules(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    return model.get_input_embeddings(), model.get_output_embeddings()


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The weight a module holds itself (a row-extension layer's ``.weight`` may be a view made for training)."""
    return module.get_base_layer().weight if isinstance(module, RowExtensionLayer) else module.weight


def _check_beside(config: RowExtensionConfig, adapter_name: str, others: dict[str, RowExtensionConfig]) -> None:
    """Row adapters side by side replace the same rows: they must share the token space; a LoRA companion belongs
    to the first one only."""
    for name, other in others.items():
        if other.token_space_sha256 != config.token_space_sha256:
            raise RowExtensionError(
                f"adapter {adapter_name!r} has token space {config.token_space_sha256[:12]} (text_vocab_size "
                f"{config.text_vocab_size}, vocab_size {config.vocab_size}) but the model's row-extension adapter "
                f"{name!r} has {other.token_space_sha256[:12]} (text_vocab_size {other.text_vocab_size}, vocab_size "
                f"{other.vocab_size}): adapters side by side need the same token space; load it onto a fresh base"
            )
    if others and config.lora_adapter is not None:
        raise RowExtensionError(
            f"adapter {adapter_name!r} carries LoRA adapter {config.lora_adapter!r}: a LoRA companion can only come "
            f"with the model's first row-extension adapter ({next(iter(others))!r}); load it onto a fresh base"
        )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise RowExtensionError(f"module {module} is not part of the model")


def _plan_injection(model: nn.Module, config: RowExtensionConfig, state_dict: Optional[dict] = None) -> _Plan:
    """Decide (and validate) everything injection will do, reading the saved rows, before any module changes."""
    modules, names, tied = _base_embeddings(model, config)
    saved, where, lora = _read_saved(model, config, state_dict, modules["input"])
    input_rows = _input_rows(saved, tied, config, modules["input"], names)
    output_rows, output_trained = None, True
    if "output" in modules and not tied:
        output_rows, output_trained = _output_rows(saved, where, config, modules["output"], names)
    rows_owned = state_dict is None
    return _Plan(modules["input"], modules.get("output"), tied, input_rows, output_rows, output_trained, lora, rows_owned)


def _base_embeddings(model: nn.Module, config: RowExtensionConfig) -> tuple[dict, dict, bool]:
    """The base's input embedding and lm_head (``{"input": ..., "output": ...}``), their names and whether they are
    tied; refuses embeddings that are offloaded, have fewer rows than the text vocabulary or disagree on hidden size."""
    input_module, output_module = _embedding_modules(model)
    if input_module is None or getattr(input_module, "weight", None) is None:
        raise RowExtensionError("the base model has no input embedding (get_input_embeddings() returned none)")
    modules = {"input": input_module} if output_module is None else {"input": input_module, "output": output_module}
    names = {role: _module_name(model, module) for role, module in modules.items()}
    weights = {role: _base_weight(module) for role, module in modules.items()}
    for role, module in modules.items():
        if weights[role].device.type == "meta":
            raise RowExtensionError(
                f"base {names[role]} has no weights in memory (offloaded to the meta device); load the base with "
                "its embeddings on a real device"
            )
        rows = full_shape(weights[role])[0]
        if rows < config.text_vocab_size:
            raise RowExtensionError(
                f"base {names[role]} has {rows} rows, fewer than the token space's text_vocab_size "
                f"{config.text_vocab_size}"
            )
    hidden = {role: full_shape(weight)[1] for role, weight in weights.items()}
    if output_module is not None and hidden["output"] != hidden["input"]:
        raise RowExtensionError(
            f"base {names['output']} hidden size {hidden['output']} differs from {names['input']} hidden size "
            f"{hidden['input']}"
        )
    return modules, names, output_module is not None and weights["output"] is weights["input"]


def _read_saved(model: nn.Module, config: RowExtensionConfig, state_dict: Optional[dict], input_module: nn.Module):
    """The saved rows (from ``state_dict``, or the adapter the config was read from; none for a new adapter), where
    they came from, and the companion LoRA; all checked against the base."""
    source = getattr(config, "weights_source", None)
    if state_dict is not None:
        saved, where = canonical_rows(state_dict), "the given adapter state dict"
    elif source:
        saved, where = canonical_rows(_load_saved_rows(source, input_module.weight)), f"{source[0]}: {WEIGHTS_NAME}"
    else:
        return {}, None, None
    lora = None
    if config.lora_adapter is not None:
        if not source:
            raise RowExtensionError(
                f"the config names LoRA adapter {config.lora_adapter!r} but was not read from a saved adapter; "
                "load with PeftModel.from_pretrained, or add a new LoRA with uti_peft.add_lora"
            )
        lora = read_lora(source, config.lora_adapter, model, input_module.weight.device)
    rows = saved.get(INPUT_ROWS_KEY, saved.get(OUTPUT_ROWS_KEY))
    check_base_model(config, model, adapter_hidden_size=rows.shape[-1] if rows is not None and rows.dim() == 2 else None)
    _check_saved_rows(saved, config, full_shape(input_module.weight)[1], _module_name(model, input_module), where)
    return saved, where, lora


def _input_rows(saved: dict, tied: bool, config: RowExtensionConfig, input_module: nn.Module, names: dict):
    """The input embedding's new rows; on a tied base the head's rows win, as the legacy loader's copy landed last."""
    if tied and OUTPUT_ROWS_KEY in saved:
        if INPUT_ROWS_KEY in saved and not torch.equal(saved[INPUT_ROWS_KEY], saved[OUTPUT_ROWS_KEY]):
            warnings.warn(
                f"the base model ties {names['input']} and {names['output']}; the adapter's lm_head rows are used "
                "for both (as the legacy loader did) and its differing input-embedding rows are ignored"
            )
        return saved[OUTPUT_ROWS_KEY]
    if INPUT_ROWS_KEY in saved:
        return saved[INPUT_ROWS_KEY]
    return init_rows(_base_weight(input_module), config)


def _output_rows(saved: dict, where: Optional[str], config: RowExtensionConfig, output_module: nn.Module, names: dict):
    """An untied lm_head's new rows and whether they are trained (else derived: the mean of its text rows)."""
    if OUTPUT_ROWS_KEY in saved and INPUT_ROWS_KEY not in saved:
        raise RowExtensionError(
            f"{where} holds lm_head rows only, but the base's {names['input']} is not tied "
            f"to {names['output']}: its new input rows would be undefined"
        )
    if OUTPUT_ROWS_KEY in saved:
        return saved[OUTPUT_ROWS_KEY], True
    if where or config.head_rows == "mean":
        warnings.warn(
            f"the adapter carries no lm_head rows and the base's {names['output']} is not tied to its input "
            f"embedding: the head's new rows {config.text_vocab_size}..{config.vocab_size - 1} are set to the "
            "mean of its text rows (not trained, not saved); the legacy loader drew them at random"
        )
        return mean_rows(_base_weight(output_module), config.text_vocab_size, config.num_new_rows), False
    return init_rows(_base_weight(output_module), config), True


def canonical_rows(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows under their on-disk names. transformers' ``save_pretrained`` of an adapter written before uti-peft
    handled it prefixed every key with ``base_model.model.``; such files load the same."""
    canonical = {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}
    return {
        key.removeprefix(PEFT_KEY_PREFIX) if key.removeprefix(PEFT_KEY_PREFIX) in canonical else key: value
        for key, value in state_dict.items()
    }


def _load_saved_rows(source: tuple[str, dict], like: torch.Tensor) -> dict[str, torch.Tensor]:
    path, hub_kwargs = source
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    where = os.path.join(path, hub_kwargs.get("subfolder") or "")
    if os.path.isdir(where) and not any(os.path.isfile(os.path.join(where, n)) for n in (WEIGHTS_NAME, "adapter_model.bin")):
        raise RowExtensionError(f"{where}: {WEIGHTS_NAME} is missing (the directory holds {sorted(os.listdir(where))})")
    try:
        return load_peft_weights(path, device=str(like.device), **hub_kwargs)
    except Exception as exc:  # missing, truncated or unreadable: say which adapter and why
        raise RowExtensionError(f"cannot read the adapter weights {WEIGHTS_NAME} of {where!r}: {exc}") from exc


def _check_saved_rows(saved: dict, config: RowExtensionConfig, hidden: int, input_name: str, where: str) -> None:
    """The saved tensors are the adapter's row blocks (`check_row_blocks`) and as wide as the base's embedding."""
    width = check_row_blocks({k: (tuple(t.shape), t.is_floating_point()) for k, t in saved.items()}, config, where)
    if width != hidden:
        raise RowExtensionError(f"{where}: the rows have hidden size {width} but the base {input_name} has hidden size {hidden}")
