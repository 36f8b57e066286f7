"""Numerics of the CPU fast paths: the lm_head backward (blocked float32 GEMMs) and the text-row statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import uti_peft
from uti_peft.row_extension.kernels import ExtendedLinear as _ExtendedLinear
from uti_peft.row_extension.layer import _text_row_stats, init_rows, mean_rows
from uti_peft.tiny import build_tiny_qwen3

from conftest import TEXT_VOCAB, probe_ids

VOCAB, HIDDEN, NEW_ROWS = 300, 24, 37
EPS32 = torch.finfo(torch.float32).eps


def assert_rounded_from(ours: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor, dtype: torch.dtype) -> None:
    """``ours`` is ``a64 @ b64`` (float64 reference) rounded to ``dtype`` after an accumulation at least as
    accurate as float32's: it lies between the roundings of ``ref -/+ k * eps32 * (|a| @ |b|)``.
    For bf16/fp16 that bound is far below half an ulp, so ``ours`` equals the rounded reference wherever
    the reference is not within float32 error of a rounding midpoint."""
    ref = a64 @ b64
    bound = a64.shape[1] * EPS32 * (a64.abs() @ b64.abs())
    lower, upper = (ref - bound).to(dtype), (ref + bound).to(dtype)
    assert ours.dtype == dtype
    outside = (ours < lower) | (ours > upper)
    assert not outside.any(), f"{int(outside.sum())} of {ours.numel()} entries off the float64 reference"
    if dtype != torch.float32:  # discriminating: mostly exactly the correctly rounded reference
        assert (ours == ref.to(dtype)).float().mean() > 0.99


def count_addmm(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.Tensor.addmm_

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting)
    return calls


@pytest.mark.parametrize("block", [16, 7, 10**9], ids=["block16", "block7", "one-block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_backward_equals_float64_reference(monkeypatch, dtype, block):
    monkeypatch.setattr(_ExtendedLinear, "reduction_block", block)
    calls = count_addmm(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype)
    bias = torch.randn(VOCAB, generator=generator).to(dtype)
    rows = weight[-NEW_ROWS:].detach().requires_grad_()  # shares storage with the weight's tail
    x = torch.randn(2, 5, HIDDEN, generator=generator).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 5, VOCAB, generator=generator).to(dtype)

    out = _ExtendedLinear.apply(x, rows, weight, bias)
    assert torch.equal(out, F.linear(x, weight, bias))
    out.backward(grad_out)

    g64 = grad_out.double().reshape(-1, VOCAB)
    assert_rounded_from(x.grad.reshape(-1, HIDDEN), g64, weight.double(), dtype)
    assert_rounded_from(rows.grad, g64[:, -NEW_ROWS:].T, x.detach().double().reshape(-1, HIDDEN), dtype)
    tokens = 10
    expected = math.ceil(VOCAB / block) + math.ceil(tokens / block) if dtype != torch.float32 else 0
    assert calls[0] == expected  # blocked float32 GEMMs for CPU bf16/fp16 only


def test_backward_under_autocast_computes_in_the_gradient_dtype(monkeypatch):
    """float32 inputs under bf16 autocast: bf16 gradient math, each gradient cast back to float32."""
    monkeypatch.setattr(_ExtendedLinear, "reduction_block", 16)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    rows = weight[-NEW_ROWS:].detach().requires_grad_()
    x = torch.randn(10, HIDDEN, generator=generator).requires_grad_()
    grad_out = torch.randn(10, VOCAB, generator=generator).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _ExtendedLinear.apply(x, rows, weight, None)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out)
    assert x.grad.dtype == rows.grad.dtype == torch.float32
    g64 = grad_out.double()
    assert_rounded_from(x.grad.to(torch.bfloat16), g64, weight.to(torch.bfloat16).double(), torch.bfloat16)
    assert torch.equal(x.grad, x.grad.to(torch.bfloat16).float())  # rounded to bf16 first
    x64 = x.detach().to(torch.bfloat16).double()
    assert_rounded_from(rows.grad.to(torch.bfloat16), g64[:, -NEW_ROWS:].T, x64, torch.bfloat16)


def _row_gradients_of_full_model(merged_state: dict, space, dtype: torch.dtype, ids: torch.Tensor) -> dict:
    """Gradients of the new rows' slice of the full matrices of a plain resized model (transformers only)."""
    reference = build_tiny_qwen3(dtype=dtype)
    reference.resize_token_embeddings(space.vocab_size, mean_resizing=False)
    reference.load_state_dict({k: v.to(dtype) for k, v in merged_state.items()})
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()
    return {
        "row_extension_output_rows": reference.get_output_embeddings().weight.grad[TEXT_VOCAB:],
        "row_extension_input_rows": reference.get_input_embeddings().weight.grad[TEXT_VOCAB:],
    }


def test_bf16_row_gradients_match_full_matrix_gradients(monkeypatch, token_space):
    """A bf16 tiny model with a vocabulary of many blocks: the rows' gradients are the full matrix's.

    Two bf16 backward passes legitimately differ by bf16 rounding, and by how much depends on the CPU (oneDNN
    runs native bf16 GEMMs with AVX512-BF16, other kernels with AVX2 only). So both are measured against the
    same model computed in float64: ours must be as close to it as the full-matrix bf16 backward is (within
    a factor of 2, plus half a bf16 ulp), which a wrong row, block or scale would miss by orders of magnitude.
    """
    monkeypatch.setattr(_ExtendedLinear, "reduction_block", 100)
    model = get_peft_model(build_tiny_qwen3(dtype=torch.bfloat16), uti_peft.RowExtensionConfig(token_space=token_space))
    merged_state = copy.deepcopy(model).merge_and_unload().state_dict()
    ids = probe_ids(token_space)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    ours = {n.split(".")[-2]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    full_bf16 = _row_gradients_of_full_model(merged_state, token_space, torch.bfloat16, ids)
    exact = _row_gradients_of_full_model(merged_state, token_space, torch.float64, ids)
    bf16_eps = torch.finfo(torch.bfloat16).eps
    for name, reference in exact.items():
        scale = reference.norm()
        assert scale > 0
        our_error = (ours[name].double() - reference).norm() / scale
        full_error = (full_bf16[name].double() - reference).norm() / scale
        assert our_error <= 2 * full_error + bf16_eps / 2, (name, float(our_error), float(full_error))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rows", [1, 8192, 20000], ids=["one-row", "one-chunk", "three-chunks"])
def test_text_row_stats_equal_float64_reference(dtype, rows):
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(rows + 5, 16, generator=generator) * 0.02 + torch.linspace(-3, 3, 16)).to(dtype)
    weight[rows:] = 1e4  # rows past the text vocabulary are ignored
    mean, std = _text_row_stats(weight, rows)
    text = weight[:rows].double()
    assert mean.dtype == std.dtype == torch.float64
    # a large mean against a small std: no cancellation in the variance
    # float32 chunk sums for bf16/fp16 weights: a few float32 roundings at most (cascade summation)
    torch.testing.assert_close(mean, text.mean(0), rtol=1e-12 if dtype == torch.float32 else 2e-6, atol=0)
    expected_std = text.std(0) if rows > 1 else torch.zeros(16, dtype=torch.float64)
    torch.testing.assert_close(std, expected_std, rtol=1e-5, atol=1e-12)
    assert torch.equal(mean.to(dtype), text.mean(0).to(dtype))


def test_init_rows_mean_noise_statistics(token_space):
    weight = (torch.randn(3000, 64, generator=torch.Generator().manual_seed(3)) * 0.5).to(torch.bfloat16)
    config = uti_peft.RowExtensionConfig(token_space=token_space)
    torch.manual_seed(0)
    new = init_rows(weight, config)
    assert new.shape == (config.num_new_rows, 64) and new.dtype == torch.bfloat16
    text = weight[: config.text_vocab_size].double()
    noise = (new.double() - text.mean(0)) / (text.std(0) * config.init_noise_factor)
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    assert torch.equal(mean_rows(weight, config.text_vocab_size, config.num_new_rows)[0], text.mean(0).to(torch.bfloat16))


def _fused_consumer_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """What a fused cross-entropy kernel does: the backbone's hidden states times ``lm_head.weight``, never the
    head module itself."""
    hidden = model.get_base_model().model(input_ids=ids).last_hidden_state[:, :-1]
    weight = model.get_output_embeddings().weight
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    return F.cross_entropy(logits, ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_consumer_of_the_head_weight_trains_the_rows(token_space, dtype, tied):
    """``lm_head.weight`` is the extended matrix, differentiable w.r.t. the rows only, without a copy: the rows'
    gradient through it is the unfused forward's, both measured against the same model in float64."""
    model = get_peft_model(build_tiny_qwen3(dtype=dtype, tied=tied), uti_peft.RowExtensionConfig(token_space=token_space))
    head = model.get_output_embeddings()
    ids = probe_ids(token_space)
    weight = head.weight
    assert weight.requires_grad and weight.shape == (token_space.vocab_size, 64)
    assert weight.data_ptr() == head.base_layer.weight.data_ptr()  # a view of the (mapped) head, not a copy
    with torch.no_grad():
        assert head.weight is head.base_layer.weight  # inference reads the frozen weight itself

    def row_grads(peft_model, loss_fn):
        peft_model.zero_grad()
        loss_fn(peft_model, ids).backward()
        return {n.split(".")[-2]: p.grad.double() for n, p in peft_model.named_parameters() if p.requires_grad}

    fused = row_grads(model, _fused_consumer_loss)
    assert head.base_layer.weight.grad is None  # the text rows get none, nothing full-size is kept
    unfused = row_grads(model, lambda m, i: m(input_ids=i, labels=i).loss)
    exact = row_grads(copy.deepcopy(model).double(), lambda m, i: m(input_ids=i, labels=i).loss)
    eps = torch.finfo(dtype).eps
    for name, reference in exact.items():
        scale = reference.norm()
        our_error = (fused[name] - reference).norm() / scale
        unfused_error = (unfused[name] - reference).norm() / scale
        assert our_error <= 2 * unfused_error + eps / 2, (name, float(our_error), float(unfused_error))
