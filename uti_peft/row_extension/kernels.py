"""Autograd kernels of the row-extension layers: the head's product and the head's weight as consumers read it.

Both keep gradients to the new rows only, without a persistent ``[vocab, hidden]`` gradient, and never copy the
extended matrix: its tail *is* the rows (a view) in the layout the head keeps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def folded(
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


class ExtendedLinear(torch.autograd.Function):
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
        return folded(lambda t: F.linear(t, weight, bias), x, bias)  # the merged model's product (frozen weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = ExtendedLinear._matmul(grad, weight).view(*grad_out.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            tail = grad_out[..., -ctx.num_rows :].reshape(-1, ctx.num_rows)
            grad_rows = ExtendedLinear._matmul(tail.T, x.reshape(-1, x.shape[-1])).to(ctx.rows_dtype)
        return grad_x, grad_rows, None, None

    @staticmethod
    def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b.to(a.dtype)`` for 2-D ``a`` ``[m, k]`` and ``b`` ``[k, n]``, in ``a``'s dtype."""
        dtype = a.dtype
        if a.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
            return a @ b.to(dtype)
        k = a.shape[1]
        block = max(1, min(int(ExtendedLinear.reduction_block), k))
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


class RowsInTail(torch.autograd.Function):
    """``weight`` itself (a view of it, no copy), made differentiable with respect to ``rows``, its tail.

    For code that reads the head's weight and multiplies by it without calling the module (TRL's fused log-prob
    head, fused linear cross-entropy kernels): their product sends its ``[vocab, hidden]`` weight gradient here,
    and only the tail rows are passed on. That gradient is transient (freed once this backward returns); the text
    rows get none, and nothing full-size is kept between steps.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.num_rows, ctx.rows_dtype = rows.shape[0], rows.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        return None, grad_weight[-ctx.num_rows :].to(ctx.rows_dtype)


def swap_rows(a: torch.Tensor, b: torch.Tensor, block: int = 1024) -> None:
    """Exchange the values of two equally shaped row blocks in place, ``block`` rows at a time (no full copy):
    how the head's tail changes hands between an adapter and its reference or another adapter."""
    with torch.no_grad():
        buffer = torch.empty_like(a[:block])
        for start in range(0, a.shape[0], block):
            x, y = a[start : start + block], b[start : start + block]
            staged = buffer[: x.shape[0]]
            staged.copy_(x)
            x.copy_(y)
            y.copy_(staged)
