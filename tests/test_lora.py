"""Rows + LoRA in one PeftModel: train both, save both, load both in one call, merge both; legacy Stage-4
outputs (rows checkpoint + a PEFT LoRA trained on the resized model) convert to that layout exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import uti_peft
from uti_peft.cli import main
from uti_peft.row_extension.lora import LORA_ADAPTER_NAME
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3

from conftest import legacy_patch, probe_ids, saved_rows, train_steps
from legacy_fixtures import legacy_patch as legacy_checkpoint_patch
from legacy_fixtures import write_legacy_checkpoint

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**overrides) -> LoraConfig:
    """Our users' Stage-4 LoRA (r=8, alpha=16 on every projection); dropout 0 keeps training deterministic."""
    return LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": PROJECTIONS, **overrides})


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_rows_and_lora(space, *, dtype=torch.float32, tied=False):
    base = build_tiny_qwen3(dtype=dtype, tied=tied)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=space))
    uti_peft.add_lora(model, lora_config())
    optimizer = train_steps(model, space, steps=3)
    return model, before, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_and_lora_train_save_and_load_back_in_one_call(tmp_path, token_space, dtype):
    model, base_before, optimizer = trained_rows_and_lora(token_space, dtype=dtype)
    text = token_space.text_vocab_size

    # only the new rows and the LoRA trained; every base weight (text rows included) is bit-identical
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("row_extension_" in n or ".lora_" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any("row_extension_output_rows" in n for n in trainable)
    assert {id(p) for p in optimizer.state} == {id(p) for n, p in model.named_parameters() if n in trainable}
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.dtype == torch.float32 for p in lora_b)  # PEFT's autocast of adapter weights, as get_peft_model
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved
    merged_view = model.base_model.model
    for name, value in base_before.items():
        current = merged_view.get_parameter(_base_name(merged_view, name)).detach()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(current[:text], value[:text]), name
        else:
            assert torch.equal(current, value), name

    ids = probe_ids(token_space)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROW_EXTENSION" and config["lora_adapter"] == LORA_ADAPTER_NAME
    assert set(saved_rows(tmp_path / "adapter")) == {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}  # rows only at the top
    lora_dir = tmp_path / "adapter" / LORA_ADAPTER_NAME
    assert json.loads((lora_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora_keys = set(load_file(lora_dir / WEIGHTS_NAME))
    # standard PEFT LoRA keys: 2 layers x 7 projections x (A, B), nothing else
    assert len(lora_keys) == 28 and all(k.startswith("base_model.model.model.layers.") for k in lora_keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_keys)

    loaded = PeftModel.from_pretrained(build_tiny_qwen3(dtype=dtype), tmp_path / "adapter")
    assert set(loaded.peft_config) == {"default", LORA_ADAPTER_NAME}
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode covers the LoRA too
    assert torch.equal(logits(loaded, ids), expected)

    trainable_again = PeftModel.from_pretrained(build_tiny_qwen3(dtype=dtype), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable

    # plain PEFT reads the LoRA sub-directory: onto the legacy-patched (rows merged) model it gives the same logits
    rows = saved_rows(tmp_path / "adapter")
    patched = legacy_patch(build_tiny_qwen3(dtype=dtype), token_space, rows[INPUT_ROWS_KEY], rows[OUTPUT_ROWS_KEY])
    assert torch.equal(logits(PeftModel.from_pretrained(patched, lora_dir), ids), expected)


def _base_name(model, state_dict_name: str) -> str:
    """The parameter name of a base state-dict entry inside the wrapped model (tuner layers add ``base_layer``)."""
    module_name, _, param = state_dict_name.rpartition(".")
    module = model.get_submodule(module_name)
    return f"{module_name}.base_layer.{param}" if isinstance(module, BaseTunerLayer) else state_dict_name


def test_merge_and_unload_merges_both_and_unload_removes_both(tmp_path, token_space):
    model, base_before, _ = trained_rows_and_lora(token_space)
    ids = probe_ids(token_space)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    merged = PeftModel.from_pretrained(build_tiny_qwen3(), tmp_path / "adapter").merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert merged.get_input_embeddings().weight.shape[0] == token_space.vocab_size
    # rows merge exactly; merging LoRA (W + s * B @ A) rounds differently from applying it, as in PEFT
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(merged, ids).argmax(-1), expected.argmax(-1))
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))

    unloaded = PeftModel.from_pretrained(build_tiny_qwen3(), tmp_path / "adapter").unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    after = unloaded.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


def test_tied_base_trains_one_set_of_rows_with_lora(tmp_path, token_space):
    model, _, optimizer = trained_rows_and_lora(token_space, tied=True)
    rows = [n for n, p in model.named_parameters() if "row_extension_" in n]
    assert rows == ["base_model.model.model.embed_tokens.row_extension_input_rows.default"]
    model.save_pretrained(tmp_path / "adapter")
    assert set(saved_rows(tmp_path / "adapter")) == {INPUT_ROWS_KEY}
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(tied=True), tmp_path / "adapter")
    ids = probe_ids(token_space)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_add_lora_refuses_what_it_cannot_do(token_space):
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
    with pytest.raises(uti_peft.RowExtensionError, match="'lm_head', the module that holds the new rows"):
        uti_peft.add_lora(model, lora_config(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(uti_peft.RowExtensionError, match="'model.embed_tokens', the module that holds the new rows"):
        uti_peft.add_lora(model, lora_config(modules_to_save=["embed_tokens"]))
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # refused before anything was injected
    with pytest.raises(ValueError, match="expected a plain name"):
        uti_peft.add_lora(model, lora_config(), adapter_name="lora.v2")
    uti_peft.add_lora(model, lora_config())
    with pytest.raises(uti_peft.RowExtensionError, match="already carries LoRA adapter 'lora'"):
        uti_peft.add_lora(model, lora_config(), adapter_name="second")
    plain_lora = get_peft_model(build_tiny_qwen3(), lora_config())
    with pytest.raises(uti_peft.RowExtensionError, match="needs a PeftModel that carries a row-extension adapter"):
        uti_peft.add_lora(plain_lora, lora_config())


def test_missing_lora_directory_is_reported_before_the_base_is_touched(tmp_path, token_space):
    model, _, _ = trained_rows_and_lora(token_space)
    model.save_pretrained(tmp_path / "adapter")
    for name in os.listdir(tmp_path / "adapter" / LORA_ADAPTER_NAME):
        os.remove(tmp_path / "adapter" / LORA_ADAPTER_NAME / name)
    base = build_tiny_qwen3()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(uti_peft.RowExtensionError, match="names LoRA adapter 'lora'"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------------- legacy Stage 4
def write_stage4(tmp_path, space, *, dtype, save_embedding_layers=False):
    """The legacy Stage-4 output: a rows checkpoint, and a PEFT LoRA trained on the legacy-patched model."""
    payload = write_legacy_checkpoint(tmp_path / "rows", space, dtype=dtype)
    patched = legacy_checkpoint_patch(build_tiny_qwen3(dtype=dtype), payload, space)
    lora = get_peft_model(patched, lora_config(init_lora_weights=False))  # random A and B: a non-trivial LoRA
    lora.save_pretrained(tmp_path / "lora", save_embedding_layers=save_embedding_layers)
    return payload


def legacy_stage4_model(tmp_path, payload, space, dtype):
    patched = legacy_checkpoint_patch(build_tiny_qwen3(dtype=dtype), payload, space)
    return PeftModel.from_pretrained(patched, tmp_path / "lora")


@pytest.mark.parametrize(
    "dtype,save_embedding_layers",
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-with-full-embedding-matrices"],
)
def test_legacy_stage4_converts_to_rows_plus_lora_exactly(tmp_path, token_space, dtype, save_embedding_layers):
    payload = write_stage4(tmp_path, token_space, dtype=dtype, save_embedding_layers=save_embedding_layers)
    if save_embedding_layers:  # the matrices PEFT wrote are dropped once their new rows are checked
        assert any(k.endswith("embed_tokens.weight") for k in load_file(tmp_path / "lora" / WEIGHTS_NAME))

    out = str(tmp_path / "adapter")
    assert main(["convert-legacy", str(tmp_path / "rows"), "-o", out, "--lora", str(tmp_path / "lora")]) == 0
    lora_weights = load_file(os.path.join(out, LORA_ADAPTER_NAME, WEIGHTS_NAME))
    original = load_file(tmp_path / "lora" / WEIGHTS_NAME)
    assert set(lora_weights) == {k for k in original if ".lora_" in k}
    assert all(torch.equal(lora_weights[k], original[k]) for k in lora_weights)

    ids = probe_ids(token_space)
    ours = PeftModel.from_pretrained(build_tiny_qwen3(dtype=dtype), out)
    assert torch.equal(logits(ours, ids), logits(legacy_stage4_model(tmp_path, payload, token_space, dtype), ids))


def test_legacy_stage4_conversion_refuses_a_foreign_lora_directory(tmp_path, token_space):
    write_stage4(tmp_path, token_space, dtype=torch.float32, save_embedding_layers=True)
    weights = load_file(tmp_path / "lora" / WEIGHTS_NAME)
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key][-1] += 1  # a new row that is not the checkpoint's
    save_file(weights, tmp_path / "lora" / WEIGHTS_NAME)
    with pytest.raises(uti_peft.RowExtensionError, match=f"{key}.*is not a LoRA weight"):
        uti_peft.convert_legacy(tmp_path / "rows", tmp_path / "adapter", lora_dir=tmp_path / "lora")
    assert not (tmp_path / "adapter").exists()  # nothing written half-way
    with pytest.raises(uti_peft.RowExtensionError, match="adapter_config.json is missing"):
        uti_peft.convert_legacy(tmp_path / "rows", tmp_path / "adapter", lora_dir=tmp_path / "rows")


def test_legacy_stage4_conversion_refuses_swapped_embedding_and_head_blocks(tmp_path, token_space):
    """Each full matrix is checked against the rows of its own role: an embedding holding the checkpoint's
    head rows (and the head its embedding rows) is another model's, even though each block exists."""
    write_stage4(tmp_path, token_space, dtype=torch.float32, save_embedding_layers=True)
    weights = load_file(tmp_path / "lora" / WEIGHTS_NAME)
    embed = next(k for k in weights if k.endswith("embed_tokens.weight"))
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    text = token_space.text_vocab_size
    assert not torch.equal(weights[embed][text:], weights[head][text:])  # the swap below changes something
    weights[embed][text:], weights[head][text:] = weights[head][text:].clone(), weights[embed][text:].clone()
    save_file(weights, tmp_path / "lora" / WEIGHTS_NAME)
    swapped = rf"({embed} .*embedding matrix|{head} .*lm_head matrix) whose rows {text}\.\. equal the checkpoint's"
    with pytest.raises(uti_peft.RowExtensionError, match=swapped):
        uti_peft.convert_legacy(tmp_path / "rows", tmp_path / "adapter", lora_dir=tmp_path / "lora")
    assert not (tmp_path / "adapter").exists()
