"""TRL (pinned in the test extra) trains the rows with its defaults: its fused log-prob head reads ``lm_head.weight``.

SFT, DPO and GRPO through `uti_peft.integrations.trl`, on a tiny Qwen3 saved with a word-level tokenizer that knows
every new token; the reference policy of DPO/GRPO is the starting adapter, equal to an independently loaded copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.save_and_load import get_base_model_state_dict
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import uti_peft
from uti_peft.tiny import build_tiny_qwen3
from uti_peft.tokenizer import add_modality_tokens, modality_token_names

from conftest import TEXT_VOCAB, probe_ids

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (a dependency of trl)
from trl import DPOConfig, GRPOConfig, SFTConfig  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, use_adapter  # noqa: E402

from uti_peft.integrations.trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: E402

FAST = dict(max_steps=2, per_device_train_batch_size=2, report_to="none", save_strategy="no", use_cpu=True,
            logging_steps=1, seed=0, learning_rate=1e-2)


def save_base(path, space, tied: bool = False):
    """A tiny Qwen3 with a tokenizer of 1,000 words plus every new token (pad: <|pad_mm|>)."""
    vocab = {f"w{i}": i for i in range(TEXT_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")
    add_modality_tokens(tokenizer, space)
    tokenizer.pad_token = "<|pad_mm|>"
    build_tiny_qwen3(tied=tied).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def base_dir(tmp_path, token_space):
    return save_base(tmp_path / "base", token_space)


def sft_data(space, n=4, length=12):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, space.vocab_size, (n, length), generator=generator)
    ids[:, :4] = torch.arange(space.text_vocab_size, space.text_vocab_size + 4)  # new ids in every sample
    return Dataset.from_dict({"input_ids": ids.tolist()})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def row_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "row_extension" in n}


@pytest.mark.parametrize("door", ["peft_config", "peft_model_with_lora"])
def test_sft_with_trl_defaults_trains_the_rows(tmp_path, base_dir, token_space, door):
    kwargs = {}
    if door == "peft_config":
        model, kwargs["peft_config"] = str(base_dir), uti_peft.RowExtensionConfig(token_space=token_space)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), _start_adapter(tmp_path, base_dir, token_space), is_trainable=True)
        uti_peft.add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = sft_data(token_space)
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "out"), **FAST), train_dataset=data, **kwargs)
    model = trainer.model
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained and all("row_extension" in n or "lora_" in n for n in trained)
    assert not any("lora_" in n for n in trained) or door == "peft_model_with_lora"

    # the first step's loss is the plain (unfused) forward's on the same batch, grounded in float64
    batch = next(iter(trainer.get_train_dataloader()))
    with trainer.accelerator.autocast():
        fused = trainer.compute_loss(model, dict(batch)).item()
        plain = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss.item()
    exact = copy.deepcopy(model).double()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss.item()
    assert abs(fused - exact) <= 2 * abs(plain - exact) + 2**-8 * abs(exact)

    base_before = load_file(base_dir / "model.safetensors")
    rows_before = row_tensors(model)
    trainer.train()
    base_after = get_base_model_state_dict(model)
    for key, value in base_before.items():
        assert torch.equal(base_after[key], value), key  # text rows and every other base weight untouched
    rows_after = row_tensors(model)
    input_key = next(k for k in rows_after if "input_rows" in k)
    moved = (rows_after[input_key] != rows_before[input_key]).any(-1)
    # every sample is seen once (2 steps of 2); a sequence's last id is an input to no scored position
    used = torch.tensor(sorted({i - token_space.text_vocab_size for s in data["input_ids"] for i in s[:-1] if i >= token_space.text_vocab_size}))
    assert moved[used].all() and moved.sum() == len(used)  # the new rows of ids in the data, and only those
    head_key = next(k for k in rows_after if "output_rows" in k)
    assert not torch.equal(rows_after[head_key], rows_before[head_key])  # the head's rows train through the fused head

    trainer.save_model(str(tmp_path / "saved"))
    assert set(load_file(tmp_path / "saved" / "adapter_model.safetensors")) == {
        "input_embeddings.new_rows", "output_embeddings.new_rows"}
    ids = probe_ids(token_space)
    # without accelerate's mixed-precision wrapper of the forward (bf16 autocast, TRL's default)
    expected = logits(trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval(), ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "saved")
    assert torch.equal(logits(reloaded, ids), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), ids), expected)


def test_sft_on_a_tied_base_trains_the_one_set_of_rows(tmp_path, token_space):
    """Tied: the fused head and the embedding send their gradients to the same rows, which the adapter saves once."""
    base_dir = save_base(tmp_path / "tied", token_space, tied=True)
    trainer = SFTTrainer(model=str(base_dir), args=SFTConfig(output_dir=str(tmp_path / "out"), **FAST),
                         train_dataset=sft_data(token_space), peft_config=uti_peft.RowExtensionConfig(token_space=token_space))
    model = trainer.model
    before = row_tensors(model)
    assert list(before) == ["base_model.model.model.embed_tokens.row_extension_input_rows.default"]
    trainer.train()
    after = row_tensors(model)
    assert not torch.equal(after[next(iter(after))], before[next(iter(before))])
    base = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(get_base_model_state_dict(model)[k], v) for k, v in base.items())
    trainer.save_model(str(tmp_path / "saved"))
    assert set(load_file(tmp_path / "saved" / "adapter_model.safetensors")) == {"input_embeddings.new_rows"}
    ids = probe_ids(token_space)
    expected = logits(trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval(), ids)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), ids), expected)


def _start_adapter(tmp_path, base_dir, token_space):
    """A starting adapter saved to disk (what a user fine-tunes further)."""
    from peft import get_peft_model

    path = tmp_path / "start"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), uti_peft.RowExtensionConfig(token_space=token_space))
    model.save_pretrained(path)
    return path


def preference_data(space, n=4):
    """Text pairs in the tokenizer's words and new tokens (DPO tokenizes them itself)."""
    names = modality_token_names(space)
    generator = torch.Generator().manual_seed(2)

    def text(k):
        ids = torch.randint(0, len(names), (k,), generator=generator).tolist()
        return " ".join(names[i] for i in ids)

    return Dataset.from_dict({"prompt": [f"w5 w6 {text(2)}" for _ in range(n)], "chosen": [f" {text(3)}" for _ in range(n)],
                              "rejected": [f" {text(3)}" for _ in range(n)]})


def frozen_copy(base_dir, adapter_dir):
    """An independently loaded, frozen copy of an adapter, with TRL's fused head."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    add_fused_lm_head(model.get_base_model())
    return model


@pytest.mark.parametrize("door", ["peft_config", "peft_model"])
def test_dpo_reference_is_the_starting_adapter(tmp_path, base_dir, token_space, door):
    args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, **FAST)
    if door == "peft_config":
        trainer = DPOTrainer(model=str(base_dir), ref_model=None, args=args, train_dataset=preference_data(token_space),
                             peft_config=uti_peft.RowExtensionConfig(token_space=token_space))
        start = tmp_path / "start"
        trainer.model.save_pretrained(start)
    else:  # TRL copies the adapter as "ref" (add_adapter with the same config)
        start = _start_adapter(tmp_path, base_dir, token_space)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), start, is_trainable=True)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=preference_data(token_space))
        assert "ref" in trainer.model.peft_config
    before = row_tensors(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in row_tensors(trainer.model).items())
    batch = next(iter(trainer.get_train_dataloader()))
    ours = trainer.compute_ref_log_probs(trainer.model, batch)
    trainer.ref_model = frozen_copy(base_dir, start)  # what TRL runs given an explicit reference model
    independent = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert all(torch.equal(a, b) for a, b in zip(ours, independent))


def test_grpo_reference_is_the_starting_adapter(tmp_path, base_dir, token_space):
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in range(j, j + 4)) for j in range(4)]})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, beta=0.1, num_generations=2, max_completion_length=4,
                      **FAST)
    trainer = GRPOTrainer(model=str(base_dir), reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                          args=args, train_dataset=prompts, peft_config=uti_peft.RowExtensionConfig(token_space=token_space))
    start = tmp_path / "start"
    trainer.model.save_pretrained(start)
    trainer.train()
    ids = probe_ids(token_space)
    mask = torch.ones_like(ids)
    with use_adapter(trainer.model, adapter_name=None):
        ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 8, batch_size=2)
    independent, _, _ = trainer._get_per_token_logps_and_entropies(frozen_copy(base_dir, start), ids, mask, 8, batch_size=2)
    assert torch.equal(ours, independent)
    trained, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 8, batch_size=2)
    assert not torch.equal(trained, ours)  # the policy moved away from its reference


def test_other_adapters_on_the_head_are_still_refused(tmp_path, base_dir):
    args = SFTConfig(output_dir=str(tmp_path / "out"), **FAST)
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        SFTTrainer(model=str(base_dir), args=args, train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]] * 2}),
                   peft_config=LoraConfig(r=4, target_modules=["lm_head"]))
    import trl.trainer.sft_trainer as sft_module
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert sft_module.BaseTunerLayer is BaseTunerLayer  # TRL's module is left as it was
