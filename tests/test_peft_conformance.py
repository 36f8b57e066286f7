"""PEFT's generic tuner behaviours (what its ``PeftCommonTester`` asks of every built-in method) on ROW_EXTENSION.

Behaviours of PEFT's common tests that do not apply, and why:
- mixed adapter batches, several *active* adapters, ``add_weighted_adapter``, LoRA conversion: rows replace base
  rows (there is no delta to mix, weigh or convert) — the refusals are tested below; several adapters side by side,
  one active at a time, are tested in tests/test_reference_and_adapters.py;
- ``disable_adapter``: a vocabulary extension has no base to fall back to (the base has no rows for the new ids), so
  disabling computes with the rows the adapter started from (tests/test_reference_and_adapters.py);
- prompt-learning and bias options: not features of this method.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.peft_model import get_model_status
from peft.utils.save_and_load import get_base_model_state_dict, set_base_model_state_dict

import uti_peft
from uti_peft.tiny import build_tiny_qwen3

from conftest import BASE_ROWS, TEXT_VOCAB, legacy_model_for, probe_ids, train_steps

VOCAB = 1576


def logits(model, ids=None, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def distinct_elements(model: torch.nn.Module) -> int:
    """Elements of all parameters, each storage element counted once (independently of PEFT's counting):
    a parameter that is a view inside another one's storage adds nothing."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), p.element_size()) for p in model.parameters())
    total, end = 0, 0
    for start, stop, size in spans:
        if stop > end:
            total += (stop - max(start, end)) // size
            end = stop
    return total


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("vocab_rows", [BASE_ROWS, VOCAB], ids=["qwen-like", "extended"])
def test_base_model_state_dict_is_the_base_s_own_and_round_trips_without_touching_the_rows(
    make_adapter, tied, vocab_rows
):
    base = build_tiny_qwen3(tied=tied, vocab_rows=vocab_rows)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, make_adapter(tied=tied, vocab_rows=vocab_rows))
    ids = probe_ids(model.peft_config["default"].get_token_space())
    expected = logits(model, ids)
    rows = {n: p.detach().clone() for n, p in model.named_parameters() if "row_extension_" in n}

    extracted = get_base_model_state_dict(model)
    assert extracted.keys() == original.keys()
    assert all(torch.equal(extracted[k], v) for k, v in original.items())

    with torch.no_grad():  # perturb everything, rows included, as PEFT's own test does
        for param in model.get_base_model().parameters():
            param.add_(0.25)
    perturbed_rows = {n: p.detach().clone() for n, p in model.named_parameters() if n in rows}
    result = set_base_model_state_dict(model, original)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, original[k]) for k, v in get_base_model_state_dict(model).items())
    # the rows are the adapter's, not the base's: loading base weights leaves them as they were
    assert all(torch.equal(p.detach(), perturbed_rows[n]) for n, p in model.named_parameters() if n in rows)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in rows:
                param.copy_(rows[name])
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parameter_counts_count_each_element_once(token_space, tied):
    base = build_tiny_qwen3(tied=tied)
    base_elements = sum(p.numel() for p in base.parameters())  # nn.Module.parameters() dedupes a tied pair
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space))
    new = token_space.num_new_rows * 64 * (1 if tied else 2)
    # the base's rows past the text vocabulary (24 here, 267 on Qwen3) are replaced by new rows, not kept
    expected_total = base_elements - (BASE_ROWS - TEXT_VOCAB) * 64 + new
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == new
    assert total == expected_total == distinct_elements(model)
    status = get_model_status(model)
    assert (status.trainable_params, status.total_params) == (trainable, total)
    printed = io.StringIO()
    with redirect_stdout(printed):
        model.print_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in printed.getvalue()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_layers_expose_the_extended_sizes(make_adapter, token_space, tied):
    adapter = make_adapter(tied=tied)
    model = PeftModel.from_pretrained(build_tiny_qwen3(tied=tied), adapter)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx) == (VOCAB, 64, None)
    assert (head.in_features, head.out_features) == (64, VOCAB)
    assert (embedding.in_features, embedding.out_features) == (VOCAB, 64)  # as PEFT's own embedding layers
    merged = copy.deepcopy(model).merge_and_unload()
    legacy = legacy_model_for(adapter, token_space, tied=tied)
    for layer, role in ((embedding, "get_input_embeddings"), (head, "get_output_embeddings")):
        assert torch.equal(layer.get_merged_weights(), getattr(merged, role)().weight)
        assert torch.equal(layer.get_merged_weights(), getattr(legacy, role)().weight)
    # an untied embedding keeps its rows apart: the base weight is the base's, the effective one is vocab_size long
    assert embedding.weight.shape[0] == (VOCAB if tied else BASE_ROWS)


def test_safe_merge_of_non_finite_rows_raises_peft_s_message(make_adapter):
    model = PeftModel.from_pretrained(build_tiny_qwen3(), make_adapter())
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embedding.rows("default")[3, 5] = float("nan")
    before = embedding.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    assert model.get_input_embeddings() is embedding and not embedding.merged
    assert torch.equal(embedding.base_layer.weight, before)


def test_merging_twice_warns_as_peft_tuners_do(make_adapter, token_space):
    model = PeftModel.from_pretrained(build_tiny_qwen3(), make_adapter())
    ids = probe_ids(token_space)
    expected = logits(model, ids)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert torch.equal(logits(model, ids), expected)


def test_weighted_adapters_are_refused(make_adapter):
    model = PeftModel.from_pretrained(build_tiny_qwen3(), make_adapter())
    with pytest.raises(uti_peft.RowExtensionError, match="add_weighted_adapter is not supported"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def test_from_pretrained_with_config_and_device_map(make_adapter, token_space):
    adapter = make_adapter()
    reference = legacy_model_for(adapter, token_space)
    ids = probe_ids(token_space)
    config = uti_peft.RowExtensionConfig.from_pretrained(adapter)
    for kwargs in ({"config": config}, {"device_map": {"": "cpu"}}, {"low_cpu_mem_usage": True}):
        loaded = PeftModel.from_pretrained(build_tiny_qwen3(), adapter, **kwargs)
        assert torch.equal(logits(loaded, ids), logits(reference, ids)), kwargs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_in_half_precision_is_exact(make_adapter, token_space, dtype):
    # rows trained in float32 (Adam in fp16 underflows), loaded onto a half-precision base
    adapter = make_adapter()
    model = PeftModel.from_pretrained(build_tiny_qwen3(dtype=dtype), adapter)
    ids = probe_ids(token_space)
    expected = logits(model, ids)
    assert expected.dtype == dtype and expected.isfinite().all()
    # the legacy recipe casts the file's float32 rows on its own (assignment into the half-precision weight)
    assert torch.equal(logits(legacy_model_for(adapter, token_space, dtype=dtype), ids), expected)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "Qwen3ForCausalLM" and merged.config.vocab_size == VOCAB
    assert torch.equal(logits(merged, ids), expected)


def test_delete_adapter_gives_the_base_back(make_adapter, token_space):
    base = build_tiny_qwen3()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, make_adapter())
    model.delete_adapter("default")
    assert not model.peft_config
    restored = model.base_model.model
    assert restored.config.vocab_size == BASE_ROWS
    restored_state = get_base_model_state_dict(model)
    assert restored_state.keys() == original.keys()
    assert all(torch.equal(restored_state[k], v) for k, v in original.items())
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")


def test_generate_and_inputs_embeds_equal_the_legacy_model(make_adapter, token_space):
    adapter = make_adapter()
    model = PeftModel.from_pretrained(build_tiny_qwen3(), adapter)
    reference = legacy_model_for(adapter, token_space)
    ids = probe_ids(token_space)[:1, :12]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=token_space.pad_token_id)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), reference.generate(input_ids=ids, **kwargs))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        by_embeds = model(inputs_embeds=embeds).logits
    assert torch.equal(embeds, reference.get_input_embeddings()(ids))
    assert torch.equal(by_embeds, logits(model, ids))


def test_gradient_checkpointing_gives_the_same_row_gradients(token_space):
    ids = probe_ids(token_space)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = model.get_base_model().model.layers
        assert all(layer.gradient_checkpointing is checkpointing for layer in layers)
        calls = []
        # a checkpointed layer runs its forward again in the backward pass; module hooks are not run for that
        # recomputation, so the MLP's forward itself is counted
        for layer in layers:
            layer.mlp.forward = lambda *a, _forward=layer.mlp.forward, **k: calls.append(1) or _forward(*a, **k)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        assert len(calls) == len(layers)
        loss.backward()
        assert len(calls) == len(layers) * (2 if checkpointing else 1)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(g is not None and g.abs().sum() > 0 for g in grads[-1].values())  # compared below: never None
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_training_moves_the_rows_only(token_space):
    base = build_tiny_qwen3()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space))
    rows_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the happy path
        train_steps(model, token_space, steps=3)
    assert all(not torch.equal(p, rows_before[n]) for n, p in model.named_parameters() if n in rows_before)
    after = get_base_model_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
