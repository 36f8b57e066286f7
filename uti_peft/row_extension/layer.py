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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import RowExtensionError
from ..memory import copy_releasing_source, extended_matrix, same_file_bytes

if TYPE_CHECKING:
    from .config import RowExtensionConfig


class RowExtensionLayer(nn.Module, BaseTunerLayer):
    """Common machinery: extend the base weight, keep the new rows attached to its tail, restore it.

    Trained rows live in a ParameterDict named after the layer's role (``row_extension_input_rows`` or
    ``row_extension_output_rows``), which is what gives them their on-disk names. Rows that are derived
    rather than trained (an lm_head whose adapter carries no head rows) live in the non-persistent
    ``row_extension_fixed_rows`` and are neither trained nor saved.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = ("row_extension_fixed_rows", "row_extension_replaced")

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
        # Base rows at or beyond text_vocab_size, kept (not saved) so that unload() restores the base exactly.
        self.row_extension_replaced = BufferDict(persistent=False)
        self.text_vocab_size: dict[str, int] = {}
        self._in_place: set[str] = set()  # adapters whose rows are the tail of the base weight
        self.register_load_state_dict_pre_hook(_skip_reloading_file_rows)

    # ------------------------------------------------------------------ set-up
    @property
    def tied_to(self) -> Optional["RowExtensionLayer"]:
        return self._tied_to[0] if self._tied_to else None

    @property
    def trained_rows(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(
        self,
        adapter_name: str,
        text_vocab_size: int,
        rows: torch.Tensor,
        trainable: bool = True,
        in_place: bool = True,
        copy: bool = True,
    ) -> None:
        """Add the adapter's new rows: a trainable, saved parameter, or (``trainable=False``) a derived buffer.

        ``in_place=True`` replaces base rows ``[text_vocab_size:]`` by ``rows`` and keeps ``rows`` as a view of
        that tail; ``in_place=False`` (an untied input embedding) keeps them apart from the untouched base weight,
        as ``rows`` itself where it already has the weight's dtype and device and ``copy=False`` (rows nobody else
        holds: a memory-mapped adapter file then stays mapped, read when looked up, as transformers keeps weights).
        """
        if self.text_vocab_size:
            raise ValueError(
                f"{type(self).__name__} already holds adapter {self.active_adapters}; a model can carry one "
                f"row-extension adapter at a time (cannot add {adapter_name!r})"
            )
        self.text_vocab_size[adapter_name] = text_vocab_size
        if self.tied_to is not None:
            sync_size_attributes(self.base_layer)
            return
        if in_place:
            rows = self._extend_in_place(adapter_name, rows)
        else:
            weight = self.base_layer.weight
            # contiguous: rows of their own, also where ``rows`` is an expanded mean row
            rows = rows.to(device=weight.device, dtype=weight.dtype, copy=copy).contiguous()
        if trainable:
            self.trained_rows[adapter_name] = nn.Parameter(rows, requires_grad=True)
        else:
            self.row_extension_fixed_rows[adapter_name] = rows

    def _extend_in_place(self, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Make the base weight ``concat(weight[:text_vocab_size], rows)``; return the view of its tail."""
        text_vocab_size = self.text_vocab_size[adapter_name]
        weight = self.base_layer.weight
        old = weight.data
        self.row_extension_replaced[adapter_name] = old[text_vocab_size:].clone()
        if old.shape[0] == text_vocab_size + rows.shape[0]:
            extended = old
        else:
            extended = extended_matrix(old, text_vocab_size, text_vocab_size + rows.shape[0])
        copy_releasing_source(extended[text_vocab_size:], rows)
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

    def attach_rows(self, adapter_name: str) -> None:
        """Make the rows parameter a view of the weight's tail again.

        Moving, casting or ``load_state_dict(assign=True)`` may give the parameter its own storage; the
        values it holds are copied back into the tail (taking the weight's dtype and device).
        """
        if self.tied_to is not None or adapter_name not in self._in_place:
            return
        rows = self.rows(adapter_name)
        tail = self.base_layer.weight.data[self.text_vocab_size[adapter_name] :]
        if rows.device.type == "meta" or _same_storage(rows, tail):
            return
        with torch.no_grad():
            tail.copy_(rows.data)
        if isinstance(rows, nn.Parameter):
            rows.data = tail
        else:
            self.row_extension_fixed_rows[adapter_name] = tail

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        if adapter_name in self._in_place:
            self.attach_rows(adapter_name)
        else:
            super()._move_adapter_to_device_of_base_layer(adapter_name, device)

    # ------------------------------------------------------------------ merge / unload
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Make the base weight hold the rows (it already does, unless they were kept apart) and record it.

        As PEFT's tuners do, merging an already merged adapter warns and does nothing, and ``safe_merge`` refuses
        non-finite rows with PEFT's own message (before the base weight is changed).
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if safe_merge and not torch.isfinite(self.rows(name)).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self.tied_to is None and name not in self._in_place:
                rows = self.rows(name)
                rows.data = self._extend_in_place(name, rows.detach())
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
        return adapter_name in self._in_place

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

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            raise RuntimeError(
                "A row-extension adapter cannot be disabled: its rows replace the base model's rows at and beyond "
                "text_vocab_size inside the base weight, so there is no separate base path to fall back to. For "
                "text-only scores use logits[..., :text_vocab_size]; to get the original base back use unload()."
            )
        self._disable_adapters = False

    def _training_rows(self) -> Optional[nn.Parameter]:
        """The rows when gradients must reach them in this forward, else None (plain full-width path)."""
        if self.merged or not self.active_adapters or not torch.is_grad_enabled():
            return None
        rows = self.rows(self.active_adapters[0])
        return rows if isinstance(rows, nn.Parameter) and rows.requires_grad else None

    def _prepare_forward(self) -> None:
        owner = self.tied_to or self
        for name in self.active_adapters:
            owner.attach_rows(name)

    def effective_rows(self) -> int:
        """Rows of the effective matrix: ``vocab_size`` while an adapter is active, else the base's own."""
        name = self.active_adapters[0] if self.active_adapters else None
        if name not in self.text_vocab_size:
            return self.base_layer.weight.shape[0]
        return self.text_vocab_size[name] + self.rows(name).shape[0]

    def effective_weight(self) -> torch.Tensor:
        """The ``[vocab_size, hidden]`` matrix this layer computes with: the base weight itself where the rows
        live in its tail, else (an untied input embedding, whose rows are kept apart) a new concatenation."""
        weight = self.base_layer.weight
        name = self.active_adapters[0] if self.active_adapters else None
        if name not in self.text_vocab_size or weight.shape[0] == self.effective_rows():
            return weight
        return torch.cat([weight[: self.text_vocab_size[name]], self.rows(name).to(weight.dtype)])

    def __repr__(self) -> str:
        return "row_extension." + super().__repr__()


class RowExtensionEmbedding(RowExtensionLayer):
    """Input embedding with new rows: text ids from the base weight, new ids from the rows (both exact
    gathers); gradients only to the new rows."""

    adapter_layer_names = ("row_extension_input_rows",)

    # what nn.Embedding exposes (and libraries read), with the extended row count
    @property
    def num_embeddings(self) -> int:
        return self.effective_rows()

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> Optional[int]:
        return self.base_layer.padding_idx

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._prepare_forward()
        name = self.active_adapters[0] if self.active_adapters else None
        separate = name in self.text_vocab_size and name not in self._in_place
        rows = self.rows(name) if separate else self._training_rows()
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
    """lm_head with new rows: one full-width matmul (exact), gradients only to the new rows."""

    adapter_layer_names = ("row_extension_output_rows",)

    # what nn.Linear exposes (and libraries read), with the extended row count
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.effective_rows()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._prepare_forward()
        rows = self._training_rows()
        if rows is None:
            return _folded(lambda x: self.base_layer(x, *args, **kwargs), hidden_states, self.base_layer.bias)
        return _ExtendedLinear.apply(hidden_states, rows, self.base_layer.weight, self.base_layer.bias)


def _folded(
    linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``linear(x)`` computed as the 2-D product ``mm(x.view(-1, in), weight.T)``, whatever ``x``'s strides.

    ``torch.matmul`` folds a 3-D input into one ``mm`` when the weight requires grad (every weight of a model as
    transformers loads it, so of a merged or legacy-patched one), but, for a frozen weight (ours), only when the
    input's leading strides allow a view: ``logits_to_keep=1``'s ``hidden[:, -1:]`` does not, and the CPU then
    runs a batched product that copies the whole transposed head first (~4 s per forward at 164,021 x 4,096 in
    bf16, against 0.08 s). Folding here takes the very ``mm`` the merged model takes: the same logits, bit for bit.
    With a bias PyTorch's own path does not depend on ``requires_grad``, so ``linear`` gets ``x`` as it is.
    """
    if x.dim() <= 2 or bias is not None:
        return linear(x)
    return linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


class _ExtendedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient is computed for the tail rows only.

    ``weight``'s tail *is* ``rows`` (a view), so the forward is the plain full-width op; the backward
    returns the input gradient and ``d/d rows`` without ever forming the ``[vocab, hidden]`` gradient.
    Under autocast the forward ran in a lower precision; the backward computes in the gradient's dtype
    and casts each gradient back to its input's dtype, as autocast's own cast ops would.

    On the CPU a bf16/fp16 product is computed as float32 GEMMs over blocks of its reduction dimension
    (``reduction_block`` at a time, operands first rounded to the gradient's dtype) and rounded to that
    dtype once at the end: what a low-precision GEMM with float32 accumulation gives, without the CPU's
    slow low-precision GEMM (on AVX2 without native bf16, ``grad @ weight`` over a 164k vocabulary ran at
    ~0.3 GFLOP/s, ~20 s per token) and without a float32 copy of the whole matrix.
    Elsewhere (GPUs) and in float32/float64 it is the plain matmul.
    """

    reduction_block = 16384  # rows of the reduction dimension converted to float32 at a time (CPU bf16/fp16)

    @staticmethod
    def forward(ctx, x, rows, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.num_rows, ctx.rows_dtype = rows.shape[0], rows.dtype
        return _folded(lambda t: F.linear(t, weight, bias), x, bias)  # the merged model's product (frozen weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = _ExtendedLinear._matmul(grad, weight).view(*grad_out.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            tail = grad_out[..., -ctx.num_rows :].reshape(-1, ctx.num_rows)
            grad_rows = _ExtendedLinear._matmul(tail.T, x.reshape(-1, x.shape[-1])).to(ctx.rows_dtype)
        return grad_x, grad_rows, None, None

    @staticmethod
    def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b.to(a.dtype)`` for 2-D ``a`` ``[m, k]`` and ``b`` ``[k, n]``, in ``a``'s dtype."""
        dtype = a.dtype
        if a.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
            return a @ b.to(dtype)
        k = a.shape[1]
        block = max(1, min(int(_ExtendedLinear.reduction_block), k))
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        # Reused buffers: a fresh float32 copy per block costs more (page faults) than the conversion.
        a_buf = torch.empty(a.shape[0], block, dtype=torch.float32)
        b_buf = torch.empty(block, b.shape[1], dtype=torch.float32)
        for start in range(0, k, block):
            stop = min(start + block, k)
            a_block, b_block = a_buf[:, : stop - start], b_buf[: stop - start]
            a_block.copy_(a[:, start:stop])
            b_block.copy_(b[start:stop].to(dtype))  # exact in float32; .to rounds a wider b as ``b.to(dtype)``
            out.addmm_(a_block, b_block)
        return out.to(dtype)


def _skip_reloading_file_rows(layer: RowExtensionLayer, state_dict: dict, prefix: str, *args) -> None:
    """Loading rows that are the very file bytes a rows parameter already maps (PEFT's ``from_pretrained`` reads the
    adapter file once to build the layers and once more to load them) is a no-op: the entry is replaced by the
    parameter itself, whose copy onto itself PyTorch skips. Any other incoming rows are loaded as usual."""
    for name, rows in layer.trained_rows.items():
        if name in layer._in_place:  # the head's tail: private memory written at injection, never a file's bytes
            continue
        key = f"{prefix}{layer.adapter_layer_names[0]}.{name}"
        incoming = state_dict.get(key)
        if torch.is_tensor(incoming) and incoming is not rows and same_file_bytes(incoming, rows):
            state_dict[key] = rows


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr()


def sync_size_attributes(module: nn.Module) -> None:
    """Keep ``num_embeddings`` / ``out_features`` in step with the weight after a resize."""
    rows = module.weight.shape[0]
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
