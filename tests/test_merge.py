"""``uti-peft merge``: the streamed standalone checkpoint equals PEFT's own model (rows) and PEFT's
``merge_and_unload()`` (rows + LoRA) bit for bit; Hub ids through the cache; bad input refused, nothing written."""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, pipeline

import uti_peft
import uti_peft.files
from uti_peft.cli import main
from uti_peft.merge import MARKER_NAME, MergeError, default_max_shard_size, merge_adapter
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY
from uti_peft.tiny import build_tiny_qwen3, build_tiny_tokenizer
from uti_peft.tokenizer import modality_token_names

from conftest import BASE_ROWS, TEXT_VOCAB, legacy_patch, probe_ids, saved_rows, train_steps
from test_hub import tiny_tokenizer
from test_lora import lora_config

sys.path.insert(0, str(Path(__file__).parent))
from hub_cache import commit_to_cache, folder_files, use_offline_cache  # noqa: E402

FULL = 1576  # tiny_token_space().vocab_size


def save_base(path: Path, *, tokenizer_size: int | None = TEXT_VOCAB, max_shard_size=None, **kwargs) -> Path:
    """A tiny Qwen3 saved by transformers (safetensors), with a text tokenizer beside it by default."""
    build_tiny_qwen3(**kwargs).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer_size:
        tiny_tokenizer(tokenizer_size).save_pretrained(path)
    return path


def save_adapter(path: Path, space, *, lora: bool = False, **kwargs) -> Path:
    """Rows (and a LoRA) trained a few steps on the tiny base built with ``kwargs``, saved."""
    config = {k: kwargs.pop(k) for k in ("head_rows",) if k in kwargs}
    model = get_peft_model(build_tiny_qwen3(**kwargs), uti_peft.RowExtensionConfig(token_space=space, **config))
    if lora:
        uti_peft.add_lora(model, lora_config())
    train_steps(model, space)
    model.save_pretrained(path)
    return path


def stored_dtypes(directory) -> dict[str, str]:
    """Each tensor's dtype as written in the safetensors headers (read by hand: transformers would load the tensors
    in the dtype config.json names, whatever the file holds)."""
    found = {}
    for shard in Path(directory).glob("*.safetensors"):
        with open(shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        found.update({name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"})
    assert found, f"no tensors in {directory}"
    return found


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def reference(base_dir, adapter_dir, dtype, merge: bool):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir)
    return model.merge_and_unload() if merge else model


BF16, FP32 = torch.bfloat16, torch.float32
# (tied, base dtype, base rows, LoRA, adapter trained on: "same" | "untied" (both row blocks), head_rows, --dtype)
CASES = {
    "untied-fp32-1024": (False, FP32, BASE_ROWS, False, "same", "trained", None),
    "tied-fp32-1024": (True, FP32, BASE_ROWS, False, "same", "trained", None),
    "untied-bf16-text-rows": (False, BF16, TEXT_VOCAB, False, "same", "trained", None),
    "tied-bf16-extended": (True, BF16, FULL, False, "same", "trained", None),
    "untied-bf16-head-mean": (False, BF16, BASE_ROWS, False, "same", "mean", None),
    "tied-both-blocks-head-wins": (True, FP32, BASE_ROWS, False, "untied", "trained", None),
    "lora-untied-bf16": (False, BF16, BASE_ROWS, True, "same", "trained", None),
    "lora-tied-fp32-extended": (True, FP32, FULL, True, "same", "trained", None),
    "lora-untied-fp32-to-bf16": (False, FP32, BASE_ROWS, True, "same", "trained", BF16),
    "untied-bf16-to-fp32": (False, BF16, TEXT_VOCAB, False, "same", "trained", FP32),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_merged_checkpoint_equals_peft(tmp_path, token_space, case):
    tied, dtype, rows, lora, trained_on, head_rows, out_dtype = CASES[case]
    base = save_base(tmp_path / "base", tied=tied, dtype=dtype, vocab_rows=rows)
    adapter_tied = tied if trained_on == "same" else False
    adapter = save_adapter(tmp_path / "adapter", token_space, lora=lora, tied=adapter_tied, dtype=dtype,
                           head_rows=head_rows)
    if trained_on == "untied":
        assert set(saved_rows(adapter)) == {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}
    if head_rows == "mean":
        assert set(saved_rows(adapter)) == {INPUT_ROWS_KEY}

    out = merge_adapter(base, adapter, tmp_path / "out", dtype=out_dtype, progress=False)

    expected_model = reference(base, adapter, out_dtype or dtype, merge=lora)
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = probe_ids(token_space)
    assert torch.equal(logits(merged, ids), logits(expected_model, ids))
    if lora:  # the very tensors of merge_and_unload(), LoRA-merged projections included
        expected_state, state = expected_model.state_dict(), merged.state_dict()
        assert expected_state.keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    assert merged.dtype == (out_dtype or dtype)
    assert set(stored_dtypes(out).values()) == {{BF16: "BF16", FP32: "F32"}[out_dtype or dtype]}  # on disk
    config = json.loads((Path(out) / "config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"]) == (FULL, token_space.pad_token_id)
    assert config["tie_word_embeddings"] is tied
    generation = json.loads((Path(out) / "generation_config.json").read_text())
    assert generation["pad_token_id"] == token_space.pad_token_id


def test_the_tiny_qwen3_base_merges_into_a_complete_checkpoint_whose_tokenizer_agrees(tmp_path, token_space,
                                                                                   make_adapter):
    base = tmp_path / "base"
    build_tiny_qwen3().save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    adapter = make_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the base has its tokenizer
        out = Path(merge_adapter(base, adapter, tmp_path / "out", progress=False))
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == FULL
    # one pad everywhere: the token space's, in the tokenizer's own files too (what GGUF converters read)
    assert tokenizer.pad_token_id == config["pad_token_id"] == generation["pad_token_id"] == token_space.pad_token_id
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<|pad_mm|>"
    assert tokenizer.convert_ids_to_tokens(list(range(TEXT_VOCAB, FULL))) == modality_token_names(token_space)
    mixed = [*tokenizer("A cat", add_special_tokens=False).input_ids, 1002, 1064, 1003, 1320]
    assert tokenizer.decode(mixed) == "A cat<|img_start|><|img_0|><|img_end|><|aud0_0|>"
    assert tokenizer.encode(tokenizer.decode(mixed), add_special_tokens=False) == mixed
    generate = pipeline("text-generation", model=str(out))  # text in, text out, from the merged directory alone
    chat = [{"role": "user", "content": "Describe this picture."}]
    reply = generate(chat, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[0] == chat[0] and reply[1]["role"] == "assistant"


def test_merged_checkpoint_equals_the_legacy_recipe(tmp_path, token_space, make_adapter):
    base = save_base(tmp_path / "base")
    adapter = make_adapter()
    out = merge_adapter(base, adapter, tmp_path / "out", progress=False)
    rows = saved_rows(adapter)
    legacy = legacy_patch(build_tiny_qwen3(), token_space, rows[INPUT_ROWS_KEY], rows[OUTPUT_ROWS_KEY])
    ids = probe_ids(token_space)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(legacy, ids))


def test_output_files_tokenizer_card_and_marker(tmp_path, token_space, make_adapter, monkeypatch):
    base = save_base(tmp_path / "base")
    adapter = make_adapter()

    def no_loading(*args, **kwargs):
        raise AssertionError("merge must not instantiate the model")

    # every model class loads through PreTrainedModel.from_pretrained (the auto classes and Qwen3ForCausalLM alike)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    out = Path(merge_adapter(base, adapter, tmp_path / "out", progress=False))
    monkeypatch.undo()

    # transformers' convention: one shard is model.safetensors without an index
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "token_space.json", "README.md", MARKER_NAME,
    }
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert uti_peft.TokenSpace.from_file(out / "token_space.json").sha256() == token_space.sha256()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == FULL
    assert tokenizer.convert_ids_to_tokens(list(range(TEXT_VOCAB, FULL))) == modality_token_names(token_space)
    mixed = [5, token_space.special_tokens["<|img_start|>"], 1064, 1320]
    assert tokenizer.decode(mixed) == "w5 <|img_start|> <|img_0|> <|aud0_0|>"  # WordLevel joins with spaces
    assert tokenizer.encode(tokenizer.decode(mixed), add_special_tokens=False) == mixed

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "uti-peft/tiny-qwen3" and card.data.base_model_relation == "merge"
    facts = card.data.uti_peft
    assert facts == json.loads((out / MARKER_NAME).read_text())
    assert facts["adapter_sha256"] == uti_peft.files.file_sha256(adapter / "adapter_model.safetensors")
    assert "| `IMAGE` | 1064..1319 | 256 |" in card.text and facts["adapter_sha256"] in card.text


def test_sharded_base_and_output(tmp_path, token_space):
    base = save_base(tmp_path / "base", max_shard_size="300KB", tokenizer_size=None)
    assert (base / "model.safetensors.index.json").exists()
    adapter = save_adapter(tmp_path / "adapter", token_space, lora=True)
    with pytest.warns(UserWarning, match="has no tokenizer files and no tokenizer was given"):
        out = Path(merge_adapter(base, adapter, tmp_path / "out", max_shard_size="400KB", progress=False))
    assert not (out / "tokenizer_config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(out / s) - 8 - int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards
    )
    ids = probe_ids(token_space)
    expected = reference(base, adapter, FP32, merge=True)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(expected, ids))
    assert default_max_shard_size() == "50GB"


def test_hub_ids_resolve_through_the_offline_cache(tmp_path, token_space, monkeypatch):
    base = save_base(tmp_path / "base")
    adapter = save_adapter(tmp_path / "adapter", token_space, lora=True)  # lora/ must come along from the cache
    local = Path(merge_adapter(base, adapter, tmp_path / "local", progress=False))
    cache = tmp_path / "hub-cache"
    commit_to_cache(cache, "org/tiny-base", folder_files(base))
    commit_to_cache(cache, "org/rows", folder_files(adapter))
    use_offline_cache(monkeypatch, cache)

    hub = Path(merge_adapter("org/tiny-base", "org/rows", tmp_path / "hub", progress=False))
    assert (hub / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (hub / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()
    assert json.loads((hub / MARKER_NAME).read_text())["lora_sha256"] is not None
    assert ModelCard.load(hub / "README.md").data.base_model == "org/tiny-base"
    with pytest.raises(MergeError, match="'org/missing' is not in the local Hub cache"):
        merge_adapter("org/missing", "org/rows", tmp_path / "nothing")

    # a path that exists locally is used as is, never looked up on the Hub (the cache has no "org/rows2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    os.symlink(adapter, tmp_path / "org" / "rows2")
    merge_adapter("org/tiny-base", "org/rows2", tmp_path / "from-local", progress=False)
    assert not (tmp_path / "nothing").exists()


# ---------------------------------------------------------------------- bad input: clear error, nothing written
@pytest.fixture
def inputs(tmp_path, token_space):
    return save_base(tmp_path / "base"), save_adapter(tmp_path / "adapter", token_space)


def refused(tmp_path, base, adapter, out, *patterns, **kwargs):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(MergeError) as info:
        merge_adapter(base, adapter, out, progress=False, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), f"{pattern!r} not in {info.value}"
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary directory


def test_output_directory_rules(tmp_path, inputs):
    base, adapter = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    # not an earlier merge output: the refusal says so at once, not "pass --overwrite" (which would be refused too)
    refused(tmp_path, base, adapter, out, f"holds no {MARKER_NAME}", "even with --overwrite")
    refused(tmp_path, base, adapter, out, f"holds no {MARKER_NAME}", overwrite=True)
    refused(tmp_path, base, adapter, base, "would replace the input", overwrite=True)
    refused(tmp_path, base, adapter, adapter, "would replace the input", overwrite=True)
    refused(tmp_path, base, adapter, tmp_path, "would replace the input", overwrite=True)
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    merge_adapter(base, adapter, out, overwrite=True, progress=False)  # empty: allowed
    (out / "stale.txt").write_text("old")
    refused(tmp_path, base, adapter, out, "already exists; pass --overwrite")  # an earlier output: the hint works
    merge_adapter(base, adapter, out, overwrite=True, progress=False)  # an earlier merge output: replaced
    assert not (out / "stale.txt").exists() and (out / MARKER_NAME).exists()


def test_adapter_that_does_not_fit_the_base(tmp_path, token_space, inputs):
    base, _ = inputs
    narrow = save_adapter(tmp_path / "narrow", token_space, hidden_size=32)
    refused(tmp_path, base, narrow, tmp_path / "out", "adapter_model.safetensors: rows have hidden size 32",
            "model.embed_tokens.weight has shape [1024, 64]")
    small = save_base(tmp_path / "small", vocab_rows=900, tokenizer_size=None)
    refused(tmp_path, small, inputs[1], tmp_path / "out", "model.embed_tokens.weight has 900 rows",
            "text_vocab_size 1000")


@pytest.mark.parametrize("size", [999, FULL])
def test_tokenizer_of_the_wrong_size(tmp_path, inputs, size):
    base, adapter = inputs
    tiny_tokenizer(size).save_pretrained(tmp_path / "tok")
    refused(tmp_path, base, adapter, tmp_path / "out", f"has {size} tokens", "text_vocab_size is 1000",
            tokenizer=tmp_path / "tok")


def test_missing_or_truncated_shard(tmp_path, token_space):
    adapter = save_adapter(tmp_path / "adapter", token_space)
    base = save_base(tmp_path / "base", max_shard_size="300KB")
    shards = sorted(base.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[:-100])
    refused(tmp_path, base, adapter, tmp_path / "out", shards[-1].name, "header and tensors account for")
    shards[-1].unlink()
    refused(tmp_path, base, adapter, tmp_path / "out", "model.safetensors.index.json: weight_map names shard",
            shards[-1].name)
    refused(tmp_path, tmp_path / "nowhere", adapter, tmp_path / "out", "does not exist")


def test_cli(tmp_path, inputs, capsys):
    base, adapter = inputs
    out = tmp_path / "out"
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--dtype", "bfloat16", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert set(stored_dtypes(out).values()) == {"BF16"}  # the tensors themselves, not only the config (base: F32)
    assert set(stored_dtypes(base).values()) == {"F32"}
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uti-peft merge: error: output directory") and err.count("\n") == 1
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "o2"), "--max-shard-size", "lots"]) == 2
    assert "max_shard_size is 'lots'" in capsys.readouterr().err
    # a base without a tokenizer: its warning is not printed before (or beside) the real error
    bare = save_base(tmp_path / "bare", tokenizer_size=None)
    capsys.readouterr()
    assert main(["merge", str(bare), str(adapter), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uti-peft merge: error: output directory") and err.count("\n") == 1
