"""Row-extension tuner layers for the input embedding and the lm_head.

The effective matrix is ``concat(base[:text_vocab_size], new_rows)``.

* lm_head (and a tied embedding, which *is* the lm_head's matrix): exact logits need the very same
  full-width matmul a merged or legacy-patched model runs, so the extended matrix is built once, in place of
  the base layer's weight (same ``nn.Parameter`` object, new storage), and the trainable ``new_rows``
  parameter is a *view* of its tail. Training sends gradients to the new rows only, without ever forming a
  full-size gradient.
* Untied input embedding: a lookup is a gather, exact wherever the rows live, so the base weight is left
  untouched and the new rows are a parameter of their own; new ids are looked up there. Loading then copies
  nothing (a memory-mapped base stays mapped) and ``unload()`` has nothing to restore.
* DeepSpeed ZeRO-3 (the *partitioned* storage mode, `uti_peft.row_extension.zero3`): no view survives partitioning,
  so the head's rows are a parameter of their own beside its extended weight, whose tail `sync_tail` sets to them
  (inside a gather) after every optimizer step; the forward is the same full-width product, gradients to the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import RowExtensionError
from ..memory import copy_releasing_source, extended_matrix, file_bytes_or_copy, holds_file_bytes
from .kernels import ExtendedLinear, RowsInTail, folded, swap_rows
from .zero3 import (
    full_shape,
    gathered,
    is_modifier_rank,
    is_partitioned,
    partition_like,
    register_external_parameter,
    zero3_enabled,
)

if TYPE_CHECKING:
    from .config import RowExtensionConfig


class RowExtensionLayer(nn.Module, BaseTunerLayer):
    """Common machinery: extend the base weight, keep the active adapter's rows in its tail, restore it.

    Trained rows live in a ParameterDict named after the layer's role (``row_extension_input_rows`` or
    ``row_extension_output_rows``), which is what gives them their on-disk names. Rows that are derived
    rather than trained (an lm_head whose adapter carries no head rows) live in the non-persistent
    ``row_extension_fixed_rows`` and are neither trained nor saved. Several adapters of one token space may
    sit side by side: in the in-place layout the weight's tail holds the active one's rows, the others keep
    theirs apart, and `set_adapter` swaps them. ``row_extension_reference_rows`` keeps the rows a trainable
    adapter started from, which is what the model computes with while adapters are disabled.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = ("row_extension_fixed_rows", "row_extension_replaced", "row_extension_reference_rows")

    def __init__(self, base_layer: nn.Module, adapter_name: str, tied_to: Optional["RowExtensionLayer"] = None):
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        # A layer tied to another (lm_head sharing the embedding's matrix) owns nothing: it is kept in a
        # list so that the owner's rows are not registered (and saved) twice.
        self._tied_to = [tied_to] if tied_to is not None else []
        setattr(self, self.adapter_layer_names[0], nn.ParameterDict())
        self.row_extension_fixed_rows = BufferDict(persistent=False)
        # Base rows at or beyond text_vocab_size, kept (not saved) so that unload() restores the base exactly;
        # keyed by the adapter whose rows are in the weight's tail.
        self.row_extension_replaced = BufferDict(persistent=False)
        self.row_extension_reference_rows = BufferDict(persistent=False)
        self.text_vocab_size: dict[str, int] = {}
        self._in_place: set[str] = set()  # the adapter whose rows are the tail of the base weight (at most one)
        self._partitioned = False  # storage mode recorded by update_layer: see `partitioned`
        self.register_load_state_dict_pre_hook(_skip_reloading_file_rows)

    # ------------------------------------------------------------------ set-up
    @property
    def tied_to(self) -> Optional["RowExtensionLayer"]:
        return self._tied_to[0] if self._tied_to else None

    @property
    def trained_rows(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[0])

    @property
    def partitioned(self) -> bool:
        """The storage mode: True where DeepSpeed ZeRO-3 partitions the weights — recorded by `update_layer`, or found
        when ``deepspeed.initialize`` partitioned a model adapted before its config existed. The head's rows are then
        a parameter of their own, written into the weight's tail by `sync_tail`, never a view of it."""
        owner = self.tied_to or self
        return owner._partitioned or is_partitioned(owner.base_layer.weight)

    def update_layer(
        self,
        adapter_name: str,
        text_vocab_size: int,
        rows: torch.Tensor,
        trainable: bool = True,
        in_place: bool = True,
        copy: bool = True,
        keep_reference: bool = False,
    ) -> None:
        """Add an adapter's new rows: a trainable, saved parameter, or (``trainable=False``) a derived buffer.

        ``in_place=True`` replaces base rows ``[text_vocab_size:]`` by ``rows`` and keeps ``rows`` as a view of
        that tail (an adapter added beside one already there keeps its rows apart until `set_adapter` makes it
        active); ``in_place=False`` (an untied input embedding) keeps them apart from the untouched base weight,
        as ``rows`` itself where it already has the weight's dtype and device and ``copy=False`` (rows nobody else
        holds: a memory-mapped adapter file then stays mapped, read when looked up, as transformers keeps weights).
        ``keep_reference`` keeps a copy of the starting rows for `enable_adapters(False)` (adapters to be trained).
        """
        partitioned = self._partitioned or zero3_enabled() or is_partitioned(self.base_layer.weight)
        if partitioned:  # checked before anything changes
            self._check_partitioned(adapter_name, in_place)
            keep_reference = False  # disabling is refused under ZeRO-3 (see enable_adapters)
        self._partitioned = partitioned
        self.text_vocab_size[adapter_name] = text_vocab_size
        if self.tied_to is not None:
            sync_size_attributes(self.base_layer)
            return
        if in_place and self._partitioned:
            rows = self._extend_partitioned(adapter_name, rows)
        elif in_place and not self._in_place:
            rows = self._extend_in_place(adapter_name, rows)
        else:
            weight = self.base_layer.weight
            # contiguous: rows of their own, also where ``rows`` is an expanded mean row
            rows = rows.to(device=weight.device, dtype=weight.dtype, copy=copy).contiguous()
        if trainable:
            self.trained_rows[adapter_name] = nn.Parameter(rows, requires_grad=True)
            if self._partitioned:  # ZeRO-3 gathers a module's own parameters only: these live in a ParameterDict
                register_external_parameter(self, self.trained_rows[adapter_name])
        else:
            self.row_extension_fixed_rows[adapter_name] = rows
        if keep_reference and trainable:
            self.row_extension_reference_rows[adapter_name] = rows.detach().clone()

    def _check_partitioned(self, adapter_name: str, in_place: bool) -> None:
        """What the partitioned (ZeRO-3) mode cannot do, refused before anything changes."""
        if self.tied_to is not None or (in_place and isinstance(self.base_layer, nn.Embedding)):
            raise RowExtensionError(
                "DeepSpeed ZeRO-3 with tied input/output embeddings is not supported by row-extension adapters (the "
                "one shared matrix would be partitioned once for two modules); use an untied base, ZeRO-2, DDP or FSDP2"
            )
        others = [name for name in self.text_vocab_size if name != adapter_name]
        if others:
            raise RowExtensionError(
                f"adapter {adapter_name!r} beside {others}: under DeepSpeed ZeRO-3 a layer holds one row-extension "
                "adapter (their rows would take turns in a partitioned weight); load one adapter per model"
            )

    def _extend_partitioned(self, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """ZeRO-3: a new base weight ``concat(weight[:text_vocab_size], rows)`` (partitioned at once where the old
        one was: a gathered weight keeps its recorded shape, so it cannot grow in place); return rows of their own."""
        text_vocab_size = self.text_vocab_size[adapter_name]
        weight = self.base_layer.weight
        with gathered([weight]):
            old = weight.data
            rows = rows.to(device=old.device, dtype=old.dtype, copy=True).contiguous()
            self.row_extension_replaced[adapter_name] = old[text_vocab_size:].clone()
            extended = torch.cat([old[:text_vocab_size], rows])
        new = nn.Parameter(extended, requires_grad=weight.requires_grad)
        partition_like(weight, new)
        self.base_layer.weight = new
        register_external_parameter(self, new)  # read by this module's forward (`_forward_partitioned`)
        self._in_place.add(adapter_name)
        sync_size_attributes(self.base_layer)
        return rows

    def _extend_in_place(self, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Make the base weight ``concat(weight[:text_vocab_size], rows)``; return the view of its tail."""
        text_vocab_size = self.text_vocab_size[adapter_name]
        weight = self.base_layer.weight
        old = weight.data
        self.row_extension_replaced[adapter_name] = file_bytes_or_copy(old[text_vocab_size:])
        if old.shape[0] == text_vocab_size + rows.shape[0]:
            extended = old
            copy_releasing_source(extended[text_vocab_size:], rows)
        else:
            extended = extended_matrix(old, text_vocab_size, text_vocab_size + rows.shape[0], tail=rows)
        weight.data = extended
        self._in_place.add(adapter_name)
        sync_size_attributes(self.base_layer)
        return extended[text_vocab_size:]

    def rows(self, adapter_name: str) -> torch.Tensor:
        """The new rows of an adapter (trained parameter or derived buffer), wherever they are owned."""
        owner = self.tied_to or self
        if adapter_name in owner.trained_rows:
            return owner.trained_rows[adapter_name]
        return owner.row_extension_fixed_rows[adapter_name]

    def _point_rows_at(self, adapter_name: str, storage: torch.Tensor) -> None:
        rows = self.rows(adapter_name)
        if isinstance(rows, nn.Parameter):
            rows.data = storage
        else:
            self.row_extension_fixed_rows[adapter_name] = storage

    def _active_row_adapter(self) -> Optional[str]:
        owner = self.tied_to or self
        return next((name for name in self.active_adapters if name in owner.text_vocab_size), None)

    def attach_rows(self, adapter_name: str) -> None:
        """Make the rows parameter a view of the weight's tail again.

        Moving, casting or ``load_state_dict(assign=True)`` may give the parameter its own storage; the
        values it holds are copied back into the tail (taking the weight's dtype and device).
        """
        if self.tied_to is not None or adapter_name not in self._in_place or self.partitioned:
            return
        rows = self.rows(adapter_name)
        tail = self.base_layer.weight.data[self.text_vocab_size[adapter_name] :]
        if rows.device.type == "meta" or _same_storage(rows, tail):
            return
        with torch.no_grad():
            tail.copy_(rows.data)
        self._point_rows_at(adapter_name, tail)

    def sync_tail(self) -> None:
        """Make the weight's tail hold the active rows again where they are not a view of it, for whatever reads the
        weight itself (a full state dict, a 16-bit save, a gathered head).

        After an optimizer step, DeepSpeed ZeRO-1/2 leave the rows in their flat buffer: the values are copied into the
        tail and the rows become its view again (`attach_rows`). Under ZeRO-3 (partitioned) rank 0 writes them into
        the gathered weight, which is partitioned again from it: a collective, every process calls it.
        """
        if self.tied_to is not None:
            return
        for name in list(self._in_place):
            if not self.partitioned:
                self.attach_rows(name)
                continue
            rows, weight = self.rows(name), self.base_layer.weight
            with gathered([rows]), gathered([weight], modifier_rank=0):
                if is_modifier_rank(0):
                    with torch.no_grad():
                        weight.data[self.text_vocab_size[name] :].copy_(rows.data)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        if adapter_name in self._in_place:
            self.attach_rows(adapter_name)
        else:
            super()._move_adapter_to_device_of_base_layer(adapter_name, device)

    # ------------------------------------------------------------------ several adapters, disabling
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter; in the in-place layout its rows take the weight's tail (one swap of the rows)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        owner = self.tied_to or self
        rows_adapters = [name for name in names if name in owner.text_vocab_size]
        if len(rows_adapters) > 1:
            raise RowExtensionError(
                f"set_adapter({rows_adapters}): only one row-extension adapter can be active at a time (their rows "
                "replace the same rows of the vocabulary)"
            )
        if rows_adapters and self.disable_adapters and rows_adapters[0] != self._active_row_adapter():
            raise RowExtensionError(
                f"set_adapter({rows_adapters[0]!r}) while adapters are disabled: the weight holds the reference rows of "
                f"{self._active_row_adapter()!r}; enable adapters first (leave the disable_adapter() block)"
            )
        super().set_adapter(names, inference_mode=inference_mode)
        if rows_adapters and self.tied_to is None:
            self._hold_in_tail(rows_adapters[0])

    def _hold_in_tail(self, adapter_name: str) -> None:
        if not self._in_place or adapter_name in self._in_place:
            return
        (current,) = self._in_place
        tail, own = self.rows(current).data, self.rows(adapter_name).data
        swap_rows(tail, own)  # the tail now holds the new adapter's values, ``own`` the previous one's
        self._point_rows_at(current, own)
        self._point_rows_at(adapter_name, tail)
        self._in_place = {adapter_name}
        self.row_extension_replaced[adapter_name] = self.row_extension_replaced.pop(current)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; the last one gives the base its rows back, else the tail passes to the next one."""
        remaining = [name for name in self.text_vocab_size if name != adapter_name]
        if adapter_name in self._in_place:
            if not remaining:
                self.restore_base(adapter_name)
            else:  # the tail's current values are the deleted adapter's: the next active one is copied in
                successor = remaining[0]
                with torch.no_grad():
                    self.rows(adapter_name).data.copy_(self.rows(successor).data)
                self._point_rows_at(successor, self.rows(adapter_name).data)
                self._in_place = {successor}
                self.row_extension_replaced[successor] = self.row_extension_replaced.pop(adapter_name)
        self.text_vocab_size.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled, the model computes with each adapter's *reference rows*: the rows it had when it was created
        or loaded for training (an adapter loaded for inference is its own reference). A vocabulary extension has
        no base to fall back to — the base has no rows for the new ids — so this is what PEFT's ``disable_adapter()``
        means here, as for PEFT's trainable tokens; the current rows come back when enabled."""
        if enabled == (not self._disable_adapters):
            return
        if not enabled and self.partitioned:
            raise RowExtensionError(
                "disabling a row-extension adapter is not supported under DeepSpeed ZeRO-3 (its reference rows would "
                "have to be swapped into partitioned weights); compute a reference with a separate frozen model"
            )
        name = self._active_row_adapter()
        if self.tied_to is None and name in self.row_extension_reference_rows:
            swap_rows(self.rows(name).data, self.row_extension_reference_rows[name])
        self._disable_adapters = not enabled

    # ------------------------------------------------------------------ merge / unload
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Make the base weight hold the rows (it already does, unless they were kept apart) and record it.

        As PEFT's tuners do, merging an already merged adapter warns and does nothing, and ``safe_merge`` refuses
        non-finite rows with PEFT's own message (before the base weight is changed).
        """
        if self.partitioned:
            raise RowExtensionError(
                "merging a row-extension adapter is not supported under DeepSpeed ZeRO-3 (the weights are partitioned "
                "placeholders); save the adapter and merge it into a full base (uti-peft merge)"
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if safe_merge and not torch.isfinite(self.rows(name)).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self.tied_to is None and not self._in_place:
                rows = self.rows(name)
                rows.data = self._extend_in_place(name, rows.detach())
            elif self.tied_to is None:
                self._hold_in_tail(name)
            self.attach_rows(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Return the base layer: resized with the rows (merge) or restored bit-exactly (unload)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            for name in list(self.row_extension_replaced):
                self.restore_base(name)
        return self.base_layer

    def restore_base(self, adapter_name: str) -> None:
        """Put the base rows back: ``concat(weight[:text_vocab_size], replaced rows)``."""
        weight = self.base_layer.weight
        keep = self.text_vocab_size[adapter_name]
        replaced = self.row_extension_replaced[adapter_name].to(weight.data)
        if weight.shape[0] == keep + replaced.shape[0]:
            weight.data[keep:].copy_(replaced)
        else:
            weight.data = torch.cat([weight.data[:keep], replaced])
        self._in_place.discard(adapter_name)
        sync_size_attributes(self.base_layer)

    def rows_share_base_storage(self, adapter_name: str) -> bool:
        """Whether the adapter's rows are the tail of the base weight (one storage, counted once)."""
        return adapter_name in self._in_place and not self.partitioned

    def mirrors_rows_in_tail(self, adapter_name: str) -> bool:
        """Whether the base weight's tail holds (a view or, partitioned, a copy of) the adapter's rows."""
        return self.tied_to is None and adapter_name in self._in_place

    def original_base_weight(self) -> torch.Tensor:
        """The base weight as the base model had it (its own row count and rows), whatever the adapter did to it:
        what PEFT's ``get_base_model_state_dict`` returns. A view where nothing was replaced, else a new tensor."""
        weight = self.base_layer.weight.detach()
        for name in self._in_place:
            keep, replaced = self.text_vocab_size[name], self.row_extension_replaced[name]
            return weight[:keep] if replaced.shape[0] == 0 else torch.cat([weight[:keep], replaced.to(weight)])
        return weight

    def load_original_base_weight(self, value: torch.Tensor) -> None:
        """Load a base weight given in the base model's own shape (PEFT's ``set_base_model_state_dict``), leaving
        the adapter's rows as they are."""
        expected = tuple(self.original_base_weight().shape)
        if tuple(value.shape) != expected:
            raise RowExtensionError(
                f"base weight of shape {tuple(value.shape)} given for a layer whose base weight has shape {expected}"
            )
        weight = self.base_layer.weight.data
        with torch.no_grad():
            for name in self._in_place:
                keep = self.text_vocab_size[name]
                weight[:keep].copy_(value[:keep])
                self.row_extension_replaced[name] = value[keep:].to(weight, copy=True)
                return
            weight.copy_(value)

    # ------------------------------------------------------------------ the effective matrix
    def _training_rows(self) -> Optional[nn.Parameter]:
        """The rows when gradients must reach them in this computation, else None (plain full-width path)."""
        name = self._active_row_adapter()
        if self.merged or self.disable_adapters or name is None or not torch.is_grad_enabled():
            return None
        rows = self.rows(name)
        return rows if isinstance(rows, nn.Parameter) and rows.requires_grad else None

    def _prepare_forward(self) -> None:
        owner = self.tied_to or self
        for name in self.active_adapters:
            owner.attach_rows(name)

    def effective_rows(self) -> int:
        """Rows of the effective matrix: ``vocab_size`` while an adapter is active, else the base's own."""
        name = self._active_row_adapter()
        if name is None:
            return full_shape(self.base_layer.weight)[0]
        return self.text_vocab_size[name] + full_shape(self.rows(name))[0]

    def get_merged_weights(self) -> torch.Tensor:
        """The ``[vocab_size, hidden]`` matrix this layer computes with (the inherited ``.weight`` of a tuner layer
        is the base layer's weight).

        In the in-place layout (the lm_head, a tied embedding) it is the base weight itself, whose tail holds the
        active rows — while those rows train, a differentiable view of it (`RowsInTail`), so a consumer that
        multiplies by it trains them. An untied embedding keeps its rows apart: a new concatenation.
        """
        self._prepare_forward()
        weight = self.base_layer.weight
        name = self._active_row_adapter()
        if self.partitioned:  # (gathered) the text rows beside the rows, their own parameter (never merged, disabled)
            if name is None:
                return weight
            return torch.cat([weight[: self.text_vocab_size[name]], self.rows(name).to(weight.dtype)])
        if name is None or weight.shape[0] != self.effective_rows():
            rows = self.rows(name) if name is not None and not self.disable_adapters else None
            if rows is None:
                return weight
            return torch.cat([weight[: self.text_vocab_size[name]], rows.to(weight.dtype)])
        rows = self._training_rows()
        return weight if rows is None else RowsInTail.apply(weight, rows)

    def __repr__(self) -> str:
        return "row_extension." + super().__repr__()


class RowExtensionEmbedding(RowExtensionLayer):
    """Input embedding with new rows: text ids from the base weight, new ids from the rows (both exact
    gathers); gradients only to the new rows."""

    adapter_layer_names = ("row_extension_input_rows",)

    # what nn.Embedding exposes (and libraries read), with the extended row count; and, as PEFT's own embedding
    # layers do, in_features/out_features
    @property
    def num_embeddings(self) -> int:
        return self.effective_rows()

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def in_features(self) -> int:
        return self.effective_rows()

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> Optional[int]:
        return self.base_layer.padding_idx

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._prepare_forward()
        name = self._active_row_adapter()
        separate = name is not None and name not in self._in_place
        if separate:
            rows = self.rows(name) if not self.disable_adapters else self.rows(name).detach()
        else:
            rows = self._training_rows()
        if rows is None:  # the extended base weight serves every id, nothing to differentiate
            return self.base_layer(input_ids, *args, **kwargs)
        text_vocab_size = self.text_vocab_size[name]
        is_new = input_ids >= text_vocab_size
        # kept apart, the base weight has no rows for new ids: look up a valid (text) row in their place
        result = self.base_layer(input_ids.masked_fill(is_new, 0) if separate else input_ids, *args, **kwargs)
        padding_idx = self.base_layer.padding_idx
        new_values = F.embedding(
            (input_ids - text_vocab_size).clamp_min(0),
            rows,
            # as in nn.Embedding, a padding row that is a new row gets no gradient
            padding_idx=padding_idx - text_vocab_size if padding_idx is not None and padding_idx >= text_vocab_size else None,
        )
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            new_values = new_values * embed_scale.to(new_values.dtype)
        return torch.where(is_new.unsqueeze(-1), new_values.to(result.dtype), result)


class RowExtensionLinear(RowExtensionLayer):
    """lm_head with new rows: one full-width matmul (exact), gradients only to the new rows.

    ``.weight`` is `get_merged_weights()`: what fused heads (TRL's, fused cross-entropy) read instead of calling
    the module, so the rows train through them too.
    """

    adapter_layer_names = ("row_extension_output_rows",)

    # what nn.Linear exposes (and libraries read), with the extended row count
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.effective_rows()

    @property
    def weight(self) -> torch.Tensor:
        return self.get_merged_weights()

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.partitioned:
            return self._forward_partitioned(hidden_states, *args, **kwargs)
        self._prepare_forward()
        rows = self._training_rows()
        if rows is None:
            return folded(lambda x: self.base_layer(x, *args, **kwargs), hidden_states, self.base_layer.bias)
        return ExtendedLinear.apply(hidden_states, rows, self.base_layer.weight, self.base_layer.bias)

    def _forward_partitioned(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """ZeRO-3 (the weight and the rows are gathered around this module: `update_layer` registers them with
        DeepSpeed): the merged model's full-width product, as in the other modes, gradients to the rows only. The
        weight's tail holds the rows after every optimizer step (`sync_tail`); where it does not (rows changed since),
        the product is taken with a copy that holds them."""
        name = self._active_row_adapter()
        if name is None:  # (merging and disabling are refused in this mode)
            return self.base_layer(hidden_states, *args, **kwargs)
        text_vocab_size, weight, rows = self.text_vocab_size[name], self.base_layer.weight, self.rows(name)
        if not torch.equal(weight[text_vocab_size:], rows.to(weight.dtype)):
            weight = torch.cat([weight[:text_vocab_size], rows.detach().to(weight.dtype)])
        return ExtendedLinear.apply(hidden_states, rows, weight, self.base_layer.bias)


def _skip_reloading_file_rows(layer: RowExtensionLayer, state_dict: dict, prefix: str, *args) -> None:
    """Loading rows that a rows parameter provably already holds, being the very file bytes it maps (PEFT's
    ``from_pretrained`` reads the adapter file once to build the layers and once more to load them), is a no-op: the
    entry is replaced by the parameter itself, whose copy onto itself PyTorch skips. Any other incoming rows are
    loaded as usual."""
    for name, rows in layer.trained_rows.items():
        key = f"{prefix}{layer.adapter_layer_names[0]}.{name}"
        incoming = state_dict.get(key)
        if torch.is_tensor(incoming) and incoming is not rows and holds_file_bytes(rows, incoming):
            state_dict[key] = rows


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr()


def sync_size_attributes(module: nn.Module) -> None:
    """Keep ``num_embeddings`` / ``out_features`` in step with the weight after a resize."""
    rows = full_shape(module.weight)[0]
    if isinstance(module, nn.Embedding):
        module.num_embeddings = rows
    elif isinstance(module, nn.Linear):
        module.out_features = rows


# ---------------------------------------------------------------------- new rows for training from scratch
def _text_row_stats(weight: torch.Tensor, text_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float64) of the text rows, chunk by chunk (no full copy).

    Each 8192-row chunk goes through one reused buffer: float32 for bf16/fp16 weights (a float32 sum of
    values with 8/11 significant bits loses next to nothing), float64 otherwise. Chunk sums and sums of
    squares about the chunk's mean are combined in float64 (Chan et al.'s parallel variance), so the
    mean is the float64 sum of chunk sums over the count and the variance has no cancellation.
    """
    rows = weight.detach()[:text_vocab_size]
    dtype = torch.float32 if torch.finfo(weight.dtype).bits <= 16 else torch.float64
    buffer = torch.empty(min(8192, rows.shape[0]), weight.shape[1], dtype=dtype, device=weight.device)
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    m2 = torch.zeros_like(total)
    count = 0
    for chunk in rows.split(8192):
        n = chunk.shape[0]
        x = buffer[:n]
        x.copy_(chunk)
        chunk_sum = x.sum(0)
        shift = chunk_sum / n
        x.sub_(shift).square_()
        chunk_sum = chunk_sum.double()
        chunk_mean = chunk_sum / n
        # sum of squares about the chunk mean: sum((x - shift)^2) - n * (mean - shift)^2
        chunk_m2 = x.sum(0).double() - n * (chunk_mean - shift.double()).square()
        if count:
            m2 += (chunk_mean - total / count).square() * (count * n / (count + n))
        m2 += chunk_m2
        total += chunk_sum
        count += n
    mean = total / text_vocab_size
    var = (m2 / max(text_vocab_size - 1, 1)).clamp_min(0)
    return mean, var.sqrt()


def mean_rows(weight: torch.Tensor, text_vocab_size: int, num_new_rows: int) -> torch.Tensor:
    """``num_new_rows`` copies of the mean of the text rows, in the weight's dtype (a head's derived rows)."""
    mean, _ = _text_row_stats(weight, text_vocab_size)
    return mean.to(weight.dtype).expand(num_new_rows, -1)


def init_rows(weight: torch.Tensor, config: "RowExtensionConfig") -> torch.Tensor:
    """New rows for training from scratch: the legacy "mean + noise * std * factor" or the plain mean."""
    mean, std = _text_row_stats(weight, config.text_vocab_size)
    if config.init_rows == "mean":
        return mean.to(weight.dtype).expand(config.num_new_rows, -1)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    noise = torch.randn(config.num_new_rows, weight.shape[1], dtype=dtype, device=weight.device)
    noise.mul_((std * config.init_noise_factor).to(dtype)).add_(mean.to(dtype))
    return noise.to(weight.dtype)
