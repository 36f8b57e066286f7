"""``uti-peft extract``: a resized checkpoint, a PEFT LoRA adapter with saved embedding layers, or a PEFT
trainable-tokens adapter becomes a row-extension adapter whose model equals the source's bit for bit (the checkpoint
loaded directly; PEFT's own load of its adapter onto a resized base); ``extract(merge(base, adapter))`` gives the
adapter's rows back byte for byte; anything that is not a vocabulary extension of BASE is refused, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import uti_peft
from uti_peft.cli import main
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.errors import ExtractError
from uti_peft.extract import CHECKPOINT, LORA, TRAINABLE_TOKENS, extract_adapter
from uti_peft.merge import merge_adapter
from uti_peft.row_extension.layer import mean_rows
from uti_peft.tiny import build_tiny_qwen3

from conftest import TEXT_VOCAB, legacy_patch, probe_ids, saved_rows, train_steps
from hub_cache import commit_to_cache, folder_files, use_offline_cache
from test_merge import save_adapter, save_base

FULL = 1576  # tiny_token_space().vocab_size
PROJECTIONS = ["q_proj", "v_proj"]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def new_rows(space, seed: int, dtype=torch.float32, hidden: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(space.num_new_rows, hidden, generator=generator).to(dtype)


def resized(space, *, tied=False, dtype=torch.float32, seed=1, **kwargs):
    """The legacy recipe's resized model: the tiny base, resized, with new rows of its own."""
    model = build_tiny_qwen3(tied=tied, dtype=dtype, **kwargs)
    hidden = model.config.hidden_size
    return legacy_patch(model, space, new_rows(space, seed, dtype, hidden),
                        None if tied else new_rows(space, seed + 1, dtype, hidden))


def save_resized(path: Path, space, **kwargs) -> Path:
    """A resized checkpoint as a user has it: save_pretrained's safetensors, with the token space beside it."""
    resized(space, **kwargs).save_pretrained(path)
    space.save(path / "token_space.json")
    return path


def ours(base_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)


# ---------------------------------------------------------------------- 1. a resized checkpoint, every door
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resized_checkpoint_loads_through_every_door_like_the_checkpoint(tmp_path, token_space, tied, dtype):
    base = save_base(tmp_path / "base", tied=tied, dtype=dtype)
    source = save_resized(tmp_path / "resized", token_space, tied=tied, dtype=dtype)
    plan = extract_adapter(base, source, tmp_path / "rows", progress=False)
    out = tmp_path / "rows"
    assert plan.kind == CHECKPOINT and plan.text_drift == 0
    assert set(saved_rows(out)) == ({INPUT_ROWS_KEY} if tied else {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY})

    ids = probe_ids(token_space)
    expected = logits(AutoModelForCausalLM.from_pretrained(source), ids)
    assert expected.dtype == dtype
    assert torch.equal(logits(ours(base, out), ids), expected)
    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained(out), ids), expected)  # records BASE
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), expected)  # transformers' door
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(out)
    assert torch.equal(logits(model, ids), expected)
    merged = merge_adapter(base, out, tmp_path / "merged", progress=False)  # and merge gives the checkpoint back
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(merged), ids), expected)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head_rows", ["trained", "mean"])
def test_round_trip_gives_the_rows_back_byte_for_byte(tmp_path, token_space, tied, head_rows):
    base = save_base(tmp_path / "base", tied=tied, dtype=torch.bfloat16)
    adapter = save_adapter(tmp_path / "adapter", token_space, tied=tied, dtype=torch.bfloat16, head_rows=head_rows)
    merged = merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    extract_adapter(base, merged, tmp_path / "back", progress=False)
    rows, back = saved_rows(adapter), saved_rows(tmp_path / "back")
    if head_rows == "mean" and not tied:  # the merged head holds the mean rows the tuner derives; they come back too
        head = load_file(Path(base) / "model.safetensors")["lm_head.weight"]
        rows[OUTPUT_ROWS_KEY] = mean_rows(head, TEXT_VOCAB, token_space.num_new_rows)
    assert rows.keys() == back.keys()
    assert all(back[k].dtype == rows[k].dtype and torch.equal(back[k], rows[k]) for k in rows)
    if head_rows == "trained":  # the very file the adapter has when saved from a model loaded onto that base
        # (its rows laid out at the base head's offset within a page, as extract lays them out: mapped at load)
        on_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(on_base, adapter).save_pretrained(tmp_path / "saved")
        assert (tmp_path / "back" / WEIGHTS_NAME).read_bytes() == (tmp_path / "saved" / WEIGHTS_NAME).read_bytes()


def test_token_space_inferred_from_the_source_tokenizer(tmp_path, token_space):
    base = save_base(tmp_path / "base")
    merged = Path(merge_adapter(base, save_adapter(tmp_path / "adapter", token_space), tmp_path / "merged",
                                progress=False))
    (merged / "token_space.json").unlink()  # only the tokenizer (with every modality token) says what the rows are
    plan = extract_adapter(base, merged, tmp_path / "rows", progress=False)
    assert plan.space.source.startswith("inferred from the tokenizer")
    assert (plan.space.text_vocab_size, plan.space.vocab_size) == (token_space.text_vocab_size, FULL)
    assert plan.space.ranges == token_space.ranges and plan.space.special_tokens == token_space.special_tokens
    assert torch.equal(saved_rows(tmp_path / "rows")[INPUT_ROWS_KEY], saved_rows(tmp_path / "adapter")[INPUT_ROWS_KEY])


def test_token_space_that_cannot_be_inferred(tmp_path, token_space):
    from test_hub import tiny_tokenizer

    base = save_base(tmp_path / "base")
    source = save_resized(tmp_path / "resized", token_space)
    (source / "token_space.json").unlink()
    with pytest.raises(ExtractError, match="the source has no token_space.json and the source .* has no tokenizer to infer one from"):
        extract_adapter(base, source, tmp_path / "rows")
    tokenizer = tiny_tokenizer(TEXT_VOCAB)  # image codes split by a special token: IMAGE is not one run of ids
    tokenizer.add_tokens(["<|img_0|>", "<|img_start|>", "<|img_1|>"], special_tokens=True)
    tokenizer.save_pretrained(source)
    with pytest.raises(ExtractError, match=r"IMAGE tokens are not one run of ids \(id 1002 is '<\|img_1\|>'\)"):
        extract_adapter(base, source, tmp_path / "rows")
    assert not (tmp_path / "rows").exists()


def test_hub_ids_through_the_offline_cache(tmp_path, token_space, monkeypatch):
    base = save_base(tmp_path / "base")
    source = save_resized(tmp_path / "resized", token_space)
    local = tmp_path / "local"
    extract_adapter(base, source, local, progress=False)
    cache = tmp_path / "hub-cache"
    commit_to_cache(cache, "org/tiny-base", folder_files(base))
    commit_to_cache(cache, "org/tiny-resized", folder_files(source))
    use_offline_cache(monkeypatch, cache)
    extract_adapter("org/tiny-base", "org/tiny-resized", tmp_path / "hub", progress=False)
    assert (tmp_path / "hub" / WEIGHTS_NAME).read_bytes() == (local / WEIGHTS_NAME).read_bytes()
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny-base"
    with pytest.raises(ExtractError, match="'org/missing' is not in the local Hub cache"):
        extract_adapter("org/tiny-base", "org/missing", tmp_path / "nothing")


def test_sharded_resized_checkpoint(tmp_path, token_space):
    base = save_base(tmp_path / "base", max_shard_size="300KB")
    source = tmp_path / "resized"
    resized(token_space).save_pretrained(source, max_shard_size="200KB")
    token_space.save(source / "token_space.json")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    extract_adapter(base, source, tmp_path / "rows", progress=False)
    ids = probe_ids(token_space)
    assert torch.equal(logits(ours(base, tmp_path / "rows"), ids),
                       logits(AutoModelForCausalLM.from_pretrained(source), ids))


# ---------------------------------------------------------------------- text drift
def test_text_drift_refused_or_accepted_within_a_stated_tolerance(tmp_path, token_space):
    base = save_base(tmp_path / "base")
    source = save_resized(tmp_path / "resized", token_space)
    weights = load_file(source / "model.safetensors")
    weights["lm_head.weight"][57, 3] += 0.25
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ExtractError) as info:
        extract_adapter(base, source, tmp_path / "rows")
    message = str(info.value)
    for part in ("model.safetensors", "lm_head.weight rows 0..999 (the text rows)", "largest difference 0.25",
                 "at token id 57", "--max-text-drift 0"):
        assert part in message, message
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(ExtractError, match="largest difference 0.25"):
        extract_adapter(base, source, tmp_path / "rows", max_text_drift=0.2)
    plan = extract_adapter(base, source, tmp_path / "rows", max_text_drift=0.3, progress=False)
    assert plan.text_drift == pytest.approx(0.25, abs=1e-6)  # reported; the adapter keeps the base's text rows
    card = (tmp_path / "rows" / "README.md").read_text()
    assert "source_text_drift" in card


# ---------------------------------------------------------------------- 2. PEFT LoRA with saved embedding layers
def text_rows_restored(peft_model, base_model) -> None:
    """What a user's gradient mask does: the vocabulary copies keep the base's text rows."""
    text = TEXT_VOCAB
    for name, param in peft_model.named_parameters():
        if "modules_to_save" in name or (name.endswith(("embed_tokens.weight", "lm_head.weight")) and param.dim() == 2):
            source = base_model.get_input_embeddings() if "embed_tokens" in name else base_model.get_output_embeddings()
            with torch.no_grad():
                param[:text] = source.weight[:text]


@pytest.mark.parametrize("how", ["modules_to_save", "save_embedding_layers"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_with_saved_embedding_layers(tmp_path, token_space, how, tied):
    base = save_base(tmp_path / "base", tied=tied)
    kwargs = {}  # save_embedding_layers: the (resized) base's own matrices, trained or not, saved whole
    if how == "modules_to_save":  # on a tied base, PEFT keeps the head tied to the embedding's copy only if asked
        kwargs = {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True} if tied else {
            "modules_to_save": ["embed_tokens", "lm_head"]}
    model = get_peft_model(resized(token_space, tied=tied),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, **kwargs))
    train_steps(model, token_space)
    text_rows_restored(model, build_tiny_qwen3(tied=tied))
    model.save_pretrained(tmp_path / "source", save_embedding_layers=how == "save_embedding_layers")
    token_space.save(tmp_path / "source" / "token_space.json")

    plan = extract_adapter(base, tmp_path / "source", tmp_path / "rows", progress=False)
    assert plan.kind == LORA and plan.lora is not None
    assert (tmp_path / "rows" / "lora" / "adapter_model.safetensors").is_file()
    lora_keys = set(load_file(tmp_path / "rows" / "lora" / "adapter_model.safetensors"))
    assert lora_keys and all(".lora_" in k for k in lora_keys)
    # PEFT's own load onto a resized base whose new rows are anything (its saved matrices replace them)
    reference = PeftModel.from_pretrained(resized(token_space, tied=tied, seed=7), tmp_path / "source")
    ids = probe_ids(token_space)
    expected = logits(reference, ids)
    assert torch.equal(logits(ours(base, tmp_path / "rows"), ids), expected)
    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "rows"), ids), expected)


def test_tied_embedding_copy_without_weight_tying_is_refused(tmp_path, token_space):
    base = save_base(tmp_path / "base", tied=True)
    model = get_peft_model(resized(token_space, tied=True), LoraConfig(r=4, target_modules=PROJECTIONS,
                                                                      modules_to_save=["embed_tokens"]))
    model.save_pretrained(tmp_path / "source")
    token_space.save(tmp_path / "source" / "token_space.json")
    with pytest.raises(ExtractError, match="without ensure_weight_tying"):
        extract_adapter(base, tmp_path / "source", tmp_path / "rows")


def test_lora_with_trained_text_rows_is_not_a_vocabulary_extension(tmp_path, token_space):
    base = save_base(tmp_path / "base")
    model = get_peft_model(resized(token_space), LoraConfig(r=4, target_modules=PROJECTIONS,
                                                           modules_to_save=["embed_tokens", "lm_head"]))
    train_steps(model, token_space)  # trains the whole matrices, text rows included
    model.save_pretrained(tmp_path / "source")
    token_space.save(tmp_path / "source" / "token_space.json")
    with pytest.raises(ExtractError, match=r"adapter_model.safetensors\): base_model.model.(model.embed_tokens|lm_head)"
                                           r".weight rows 0..999 \(the text rows\) differ"):
        extract_adapter(base, tmp_path / "source", tmp_path / "rows")
    assert not (tmp_path / "rows").exists()


# ---------------------------------------------------------------------- 3. PEFT trainable tokens
@pytest.mark.parametrize("how", ["TrainableTokensConfig", "LoraConfig.trainable_token_indices"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens(tmp_path, token_space, how, tied):
    base = save_base(tmp_path / "base", tied=tied)
    indices = list(range(TEXT_VOCAB - 3, FULL))  # three text ids too: trained, but kept at the base's values
    if how == "TrainableTokensConfig":
        config = TrainableTokensConfig(token_indices=indices, target_modules=["embed_tokens"])
    else:
        config = LoraConfig(r=4, lora_dropout=0.0, target_modules=PROJECTIONS, trainable_token_indices=indices)
    model = get_peft_model(resized(token_space, tied=tied), config)
    train_steps(model, token_space)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param[:3] = build_tiny_qwen3(tied=tied).get_input_embeddings().weight[TEXT_VOCAB - 3:TEXT_VOCAB]
    model.save_pretrained(tmp_path / "source")
    token_space.save(tmp_path / "source" / "token_space.json")

    plan = extract_adapter(base, tmp_path / "source", tmp_path / "rows", progress=False)
    assert plan.kind == (TRAINABLE_TOKENS if how == "TrainableTokensConfig" else LORA)
    assert bool(plan.notes) == (not tied)  # an untied head's new rows were never in the adapter
    # PEFT's own load onto the base resized by hand; an untied head's new rows set as the adapter records (mean)
    target = resized(token_space, tied=tied, seed=9)
    if not tied:
        with torch.no_grad():
            head = target.get_output_embeddings().weight
            head[TEXT_VOCAB:] = mean_rows(head, TEXT_VOCAB, token_space.num_new_rows)
    ids = probe_ids(token_space)
    expected = logits(PeftModel.from_pretrained(target, tmp_path / "source"), ids)
    assert torch.equal(logits(ours(base, tmp_path / "rows"), ids), expected)


def test_trainable_tokens_that_miss_new_ids_or_change_text_ones(tmp_path, token_space):
    base = save_base(tmp_path / "base")
    model = get_peft_model(resized(token_space), TrainableTokensConfig(token_indices=list(range(5, FULL - 1)),
                                                                       target_modules=["embed_tokens"]))
    model.save_pretrained(tmp_path / "short")
    token_space.save(tmp_path / "short" / "token_space.json")
    with pytest.raises(ExtractError, match=r"token_indices must cover the new ids 1000..1575 .* missing \[1575\]"):
        extract_adapter(base, tmp_path / "short", tmp_path / "rows")
    model = get_peft_model(resized(token_space), TrainableTokensConfig(token_indices=list(range(5, FULL)),
                                                                       target_modules=["embed_tokens"]))
    train_steps(model, token_space)
    model.save_pretrained(tmp_path / "text")
    token_space.save(tmp_path / "text" / "token_space.json")
    with pytest.raises(ExtractError, match="changes text token id"):
        extract_adapter(base, tmp_path / "text", tmp_path / "rows")
    assert not (tmp_path / "rows").exists()


# ---------------------------------------------------------------------- 4. bad input: one line, exit 2, nothing written
def refused_by_cli(tmp_path, capsys, base, source, *parts, extra=()):
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # what building the inputs printed
    assert main(["extract", str(base), str(source), "-o", str(tmp_path / "rows"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uti-peft extract: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_sources_are_refused(tmp_path, token_space, capsys):
    base = save_base(tmp_path / "base")
    ts = ["--token-space", str(save_resized(tmp_path / "resized", token_space) / "token_space.json")]
    narrow = save_resized(tmp_path / "narrow", token_space, hidden_size=32)
    refused_by_cli(tmp_path, capsys, base, narrow, "hidden_size is 32 but the base's is 64")
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=FULL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    refused_by_cli(tmp_path, capsys, base, llama, "model_type is 'llama' but the base's is 'qwen3'", extra=ts)
    # no new rows: the base itself, with or without a token space
    refused_by_cli(tmp_path, capsys, base, base, "adds no tokens", "no new rows")
    refused_by_cli(tmp_path, capsys, base, base, "model.embed_tokens.weight has 1024 rows but the token space",
                   extra=ts)
    text_only = tmp_path / "text-only"
    build_tiny_qwen3(vocab_rows=TEXT_VOCAB).save_pretrained(text_only)
    refused_by_cli(tmp_path, capsys, base, text_only, "has 1000 rows, no more than", "no new rows", extra=ts)
    # another tensor changed: a fine-tune, not a vocabulary extension
    tuned = tmp_path / "resized"
    weights = load_file(tuned / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] += 0.5
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    refused_by_cli(tmp_path, capsys, base, tuned, "is not a vocabulary extension", "1 tensor(s) besides",
                   "model.layers.1.mlp.down_proj.weight (max |difference| 0.5)")
    # a PEFT adapter of another method; a LoRA without its embedding layers; our own adapter
    ia3 = tmp_path / "ia3"
    from peft import IA3Config

    get_peft_model(resized(token_space), IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"])).save_pretrained(ia3)
    refused_by_cli(tmp_path, capsys, base, ia3, "ia3/adapter_config.json: peft_type is 'IA3'", extra=ts)
    plain = tmp_path / "plain-lora"
    get_peft_model(resized(token_space), LoraConfig(r=4, target_modules=PROJECTIONS)).save_pretrained(
        plain, save_embedding_layers=False)
    refused_by_cli(tmp_path, capsys, base, plain, "holds no embedding matrix", extra=ts)
    rows = save_adapter(tmp_path / "ours", token_space)
    refused_by_cli(tmp_path, capsys, base, rows, "already a row-extension adapter")


def test_cli_writes_and_refuses_an_existing_output(tmp_path, token_space, capsys):
    base = save_base(tmp_path / "base")
    source = save_resized(tmp_path / "resized", token_space)
    assert main(["extract", str(base), str(source), "-o", str(tmp_path / "rows"), "--no-progress"]) == 0
    assert "576 new input and lm_head rows (ids 1000..1575) from a resized checkpoint" in capsys.readouterr().out
    first = (tmp_path / "rows" / WEIGHTS_NAME).read_bytes()
    refused_by_cli(tmp_path, capsys, base, source, "already exists; pass --overwrite")
    assert main(["extract", str(base), str(source), "-o", str(tmp_path / "rows"), "--overwrite", "--no-progress"]) == 0
    assert (tmp_path / "rows" / WEIGHTS_NAME).read_bytes() == first
    assert main(["extract", str(base), str(source), "-o", str(source), "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's own usage error: one line, exit 2
        main(["extract", str(base), str(source), "-o", str(tmp_path / "x"), "--max-text-drift", "-1"])
    assert info.value.code == 2 and "must be a finite number >= 0, got -1" in capsys.readouterr().err


def test_inspect_recognises_what_extract_accepts(tmp_path, token_space, capsys):
    source = save_resized(tmp_path / "resized", token_space)
    model = get_peft_model(resized(token_space), LoraConfig(r=4, target_modules=PROJECTIONS,
                                                           modules_to_save=["embed_tokens", "lm_head"]))
    model.save_pretrained(tmp_path / "lora")
    get_peft_model(resized(token_space), TrainableTokensConfig(token_indices=list(range(TEXT_VOCAB, FULL)),
                                                               target_modules=["embed_tokens"])).save_pretrained(
        tmp_path / "tokens")
    capsys.readouterr()
    expected = {"resized": (CHECKPOINT, "vocab_rows"), "lora": (LORA, "vocabulary_tensors"),
                "tokens": (TRAINABLE_TOKENS, "token_indices")}
    for name, (kind, field) in expected.items():
        assert main(["inspect", str(tmp_path / name), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == kind and field in info, info
        assert info["next"] == f"uti-peft extract BASE {tmp_path / name} -o ADAPTER"
    info = uti_peft.legacy.inspect_checkpoint(source)
    assert (info["vocab_rows"], info["row_range"]) == (FULL, f"[{TEXT_VOCAB}, {FULL})")
    vocabulary = uti_peft.legacy.inspect_checkpoint(tmp_path / "lora")["vocabulary_tensors"]
    assert vocabulary["base_model.model.model.embed_tokens.weight"] == "[1576, 64] F32"
    assert uti_peft.legacy.inspect_checkpoint(tmp_path / "tokens")["token_indices"] == "576 ids, 1000..1575"
