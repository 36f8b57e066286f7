"""Legacy ``trainable_rows.pt`` checkpoints -> PEFT adapters -> legacy again, on real files and tiny Qwen3 bases."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import uti_peft
from uti_peft.cli import main
from uti_peft.errors import LegacyCheckpointError
from uti_peft.legacy import inspect_checkpoint
from uti_peft.legacy.checkpoint import _atomic_output
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

from legacy_fixtures import (
    DROP,
    RunsCodeOnLoad,
    legacy_patch,
    probe_ids,
    same_bytes,
    write_legacy_checkpoint,
)

BASE_ROWS = 1024  # more rows than text_vocab_size (1000), like Qwen3's 151,936 vs 151,669
SPACE = tiny_token_space()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(root) -> list[str]:
    """Every path under ``root`` (to prove a failed command left nothing behind)."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, name), root) for name in dirs + files]
    return sorted(found)


def load_converted(adapter, *, tied, dtype):
    return PeftModel.from_pretrained(build_tiny_qwen3(vocab_rows=BASE_ROWS, tied=tied, dtype=dtype), adapter)


# ---------------------------------------------------------------------------------------- exactness
CASES = {
    # id: (tied, base dtype, rows dtype, lm_head)
    "untied-bf16": (False, torch.bfloat16, torch.bfloat16, True),
    "untied-fp16": (False, torch.float16, torch.float16, True),
    "untied-fp32": (False, torch.float32, torch.float32, True),
    "untied-bf16-rows-on-fp32-base": (False, torch.float32, torch.bfloat16, True),
    "tied-bf16-no-lm_head": (True, torch.bfloat16, torch.bfloat16, False),
    "tied-fp32-lm_head-lands-last": (True, torch.float32, torch.float32, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_adapter_matches_legacy_patched_model_exactly(tmp_path, capsys, case):
    tied, base_dtype, rows_dtype, lm_head = CASES[case]
    payload = write_legacy_checkpoint(tmp_path / "ckpt", SPACE, dtype=rows_dtype, lm_head=lm_head)
    adapter = uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter", progress=True)
    assert "reading trainable_rows.pt" in capsys.readouterr().err  # the progress bar, forced on

    saved = load_file(os.path.join(adapter, WEIGHTS_NAME))
    assert same_bytes(saved[INPUT_ROWS_KEY], payload["embeddings"])  # dtype kept, bit for bit
    assert (OUTPUT_ROWS_KEY in saved) == lm_head
    if lm_head:
        assert same_bytes(saved[OUTPUT_ROWS_KEY], payload["lm_head"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_converted(adapter, tied=tied, dtype=base_dtype)
    legacy = legacy_patch(build_tiny_qwen3(vocab_rows=BASE_ROWS, tied=tied, dtype=base_dtype), payload, SPACE)
    ids = probe_ids(SPACE)
    ours = logits(model, ids)
    assert ours.shape[-1] == SPACE.vocab_size
    assert torch.equal(ours, logits(legacy, ids))
    assert model.config.pad_token_id == legacy.config.pad_token_id == SPACE.pad_token_id
    assert model.config.vocab_size == SPACE.vocab_size
    if tied and lm_head:  # the shared matrix holds the head rows, and the loader says the input rows were dropped
        weight = model.get_input_embeddings().weight
        assert torch.equal(weight[SPACE.text_vocab_size :], payload["lm_head"].to(base_dtype))
        assert any("lm_head rows are used for both" in str(w.message) for w in caught)


def test_untied_base_without_lm_head_gets_mean_head_rows_and_says_so(tmp_path, capsys):
    payload = write_legacy_checkpoint(tmp_path / "ckpt", SPACE, dtype=torch.float32, lm_head=False)
    assert main(["convert-legacy", str(tmp_path / "ckpt"), "-o", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "no lm_head rows" in out and "mean of its text rows" in out

    adapter = tmp_path / "adapter"
    assert set(load_file(adapter / WEIGHTS_NAME)) == {INPUT_ROWS_KEY}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["head_rows"] == "mean"
    assert "not stored: on an untied base the mean of the head's text rows" in (adapter / "README.md").read_text()

    with pytest.warns(UserWarning, match=r"head's new rows 1000\.\.1575 are set to the\s+mean of its text rows"):
        model = load_converted(adapter, tied=False, dtype=torch.float32)
    # the legacy loader left these head rows random; what we load is the mean of the head's text rows
    legacy = legacy_patch(build_tiny_qwen3(vocab_rows=BASE_ROWS), payload, SPACE)
    head = legacy.get_output_embeddings().weight
    with torch.no_grad():
        mean = head[: SPACE.text_vocab_size].to(torch.float64).sum(0) / SPACE.text_vocab_size
        head[SPACE.text_vocab_size :] = mean.to(head.dtype)
    ids = probe_ids(SPACE)
    assert torch.equal(logits(model, ids), logits(legacy, ids))


def test_shared_storage_views_from_a_tied_trainer_convert_to_compact_rows(tmp_path):
    """A trainer on a tied model may save views of the full matrix, lm_head the very same tensor."""
    full = torch.randn(SPACE.vocab_size, 64).to(torch.bfloat16)
    rows = full[SPACE.text_vocab_size :]
    payload = write_legacy_checkpoint(tmp_path / "ckpt", SPACE, pt_overrides={"embeddings": rows, "lm_head": rows})
    adapter = uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    saved = load_file(os.path.join(adapter, WEIGHTS_NAME))
    assert same_bytes(saved[INPUT_ROWS_KEY], rows) and same_bytes(saved[OUTPUT_ROWS_KEY], rows)
    assert os.path.getsize(os.path.join(adapter, WEIGHTS_NAME)) < 2 * rows.numel() * 2 + 4096
    model = load_converted(adapter, tied=True, dtype=torch.bfloat16)
    legacy = legacy_patch(build_tiny_qwen3(vocab_rows=BASE_ROWS, tied=True, dtype=torch.bfloat16), payload, SPACE)
    ids = probe_ids(SPACE)
    assert torch.equal(logits(model, ids), logits(legacy, ids))


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "dtype,lm_head,zipfile",
    [(torch.bfloat16, True, True), (torch.float32, False, True), (torch.float16, True, False)],
    ids=["bf16-lm_head", "fp32-no-lm_head", "fp16-old-torch-format"],
)
def test_convert_then_export_gives_back_byte_identical_tensors(tmp_path, dtype, lm_head, zipfile):
    source = tmp_path / "ckpt"
    payload = write_legacy_checkpoint(source, SPACE, dtype=dtype, lm_head=lm_head, zipfile=zipfile)
    assert main(["convert-legacy", str(source), "-o", str(tmp_path / "adapter")]) == 0
    assert main(["export-legacy", str(tmp_path / "adapter"), "-o", str(tmp_path / "back")]) == 0

    back = torch.load(tmp_path / "back" / "trainable_rows.pt", weights_only=True)
    assert list(back) == ["row_start", "row_end", "base_llm", "embeddings", "lm_head", "dtype"]
    assert same_bytes(back["embeddings"], payload["embeddings"])
    if lm_head:
        assert same_bytes(back["lm_head"], payload["lm_head"])
    else:
        assert back["lm_head"] is None
    assert {k: back[k] for k in ("row_start", "row_end", "base_llm", "dtype")} == {
        k: payload[k] for k in ("row_start", "row_end", "base_llm", "dtype")
    }
    assert json.loads((tmp_path / "back" / "trainable_rows.json").read_text()) == json.loads(
        (source / "trainable_rows.json").read_text()
    )
    assert (tmp_path / "back" / "token_space.json").read_bytes() == (source / "token_space.json").read_bytes()
    if zipfile:  # same torch, same payload: even the archive is the same bytes
        assert (tmp_path / "back" / "trainable_rows.pt").read_bytes() == (source / "trainable_rows.pt").read_bytes()

    # and converting the exported checkpoint again gives the very same adapter weights file
    again = uti_peft.convert_legacy(tmp_path / "back", tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes()
    assert os.path.isdir(again)


# ---------------------------------------------------------------------------------------- card, options
def test_card_records_provenance_eval_and_options(tmp_path):
    source = tmp_path / "run" / "checkpoint-7000"
    write_legacy_checkpoint(source, SPACE, dtype=torch.bfloat16, with_token_space=False)
    space_path = tmp_path / "run" / "token_space.json"
    SPACE.save(space_path)
    report = {"loss_mean": {"all": 2.3456, "a2t": 1.875, "i2t": 3.125}, "counts": {"all": 30, "a2t": 10, "i2t": 20}}
    report_path = source / "eval_step7000.json"
    report_path.write_text(json.dumps(report))
    argv = ["convert-legacy", str(source), "-o", str(tmp_path / "adapter"), "--token-space", str(space_path),
            "--eval-report", str(report_path), "--dtype", "float32", "--base-model", "my-org/tiny-base"]
    assert main(argv) == 0

    adapter = tmp_path / "adapter"
    assert sorted(os.listdir(adapter)) == ["README.md", "adapter_config.json", WEIGHTS_NAME, "token_space.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny-base"
    assert config["peft_type"] == "ROW_EXTENSION" and config["token_space_sha256"] == SPACE.sha256()
    rows = load_file(adapter / WEIGHTS_NAME)
    source_rows = torch.load(source / "trainable_rows.pt", weights_only=True)
    assert rows[INPUT_ROWS_KEY].dtype == torch.float32
    assert torch.equal(rows[INPUT_ROWS_KEY], source_rows["embeddings"].float())

    card = (adapter / "README.md").read_text()
    sha = hashlib.sha256((source / "trainable_rows.pt").read_bytes()).hexdigest()
    for expected in (sha, str(source), "trainable_rows.pt", "| Row start | 1000 |", "| Row end | 1576 |",
                     "| Dtype | float32 |", "bfloat16", "uti-peft/tiny-qwen3", "my-org/tiny-base",
                     "| a2t | 1.875 | 10 |", "| i2t | 3.125 | 20 |", "PeftModel.from_pretrained", "`AUDIO_CB3`"):
        assert expected in card, expected

    report_path.write_text(json.dumps({"counts": {"all": 30}}))
    with pytest.raises(LegacyCheckpointError, match=r"eval_step7000.json: an eval report needs a 'loss_mean' object"):
        uti_peft.convert_legacy(source, tmp_path / "adapter2", token_space=space_path, eval_report=report_path)
    assert not (tmp_path / "adapter2").exists()


def test_nonfinite_rows_are_refused_unless_allowed(tmp_path):
    embeddings = torch.randn(SPACE.num_new_rows, 64).to(torch.bfloat16)
    embeddings[5, 3] = float("nan")
    lm_head = torch.randn(SPACE.num_new_rows, 64).to(torch.bfloat16)
    lm_head[7, 0] = float("inf")
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, pt_overrides={"embeddings": embeddings, "lm_head": lm_head})
    before = snapshot(tmp_path)
    message = r"embeddings has NaN/Inf values in 1 row\(s\), token ids \[1005\].*--allow-nonfinite"
    with pytest.raises(LegacyCheckpointError, match=message):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    assert snapshot(tmp_path) == before

    with pytest.warns(UserWarning, match=r"lm_head has NaN/Inf values in 1 row\(s\), token ids \[1007\]"):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter", allow_nonfinite=True)
    saved = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert same_bytes(saved[INPUT_ROWS_KEY], embeddings) and same_bytes(saved[OUTPUT_ROWS_KEY], lm_head)


def test_cast_that_overflows_is_refused(tmp_path):
    embeddings = torch.randn(SPACE.num_new_rows, 64)
    embeddings[2, 2] = 1e6  # finite in float32, inf in float16
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, dtype=torch.float32, pt_overrides={"embeddings": embeddings})
    with pytest.raises(LegacyCheckpointError, match=r"embeddings cast to float16 has NaN/Inf values .* \[1002\]"):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter", dtype="float16")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("rows_dtype", [torch.bfloat16, torch.float32])
def test_card_hash_is_the_written_file_and_a_bad_write_is_refused(tmp_path, monkeypatch, rows_dtype):
    import uti_peft.legacy.convert as legacy  # where convert_legacy looks the predictor up
    from huggingface_hub import ModelCard

    from uti_peft.card import card_facts

    def facts(adapter):
        return card_facts(ModelCard.load(os.path.join(adapter, "README.md")))

    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, dtype=rows_dtype)
    source_sha = hashlib.sha256((tmp_path / "ckpt" / "trainable_rows.pt").read_bytes()).hexdigest()
    for name, dtype in (("kept", None), ("cast", "float16")):  # same dtype, and a cast (fresh tensors)
        adapter = uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / name, dtype=dtype)
        weights_sha = hashlib.sha256((tmp_path / name / WEIGHTS_NAME).read_bytes()).hexdigest()
        assert facts(adapter)["adapter_sha256"] == weights_sha  # hashed while written, yet the file's hash
        assert facts(adapter)["provenance"]["source_sha256"] == source_sha

    # a header other than the predicted one: the written bytes are hashed instead
    predict = legacy._hash_as_safetensors
    monkeypatch.setattr(legacy, "_hash_as_safetensors", lambda *a: (b"other", predict(*a)[1]))
    adapter = uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "other")
    written = (tmp_path / "other" / WEIGHTS_NAME).read_bytes()
    assert facts(adapter)["adapter_sha256"] == hashlib.sha256(written).hexdigest()
    monkeypatch.setattr(legacy, "_hash_as_safetensors", predict)

    save_file = legacy.save_file
    for damage in ("flip", "truncate", "drop"):
        def bad_save_file(rows, path, metadata=None, damage=damage):
            save_file(rows if damage != "drop" else dict(list(rows.items())[:1]), path, metadata=metadata)
            data = bytearray(open(path, "rb").read())
            if damage == "flip":
                data[-5] ^= 1
            with open(path, "wb") as f:
                f.write(data[:-2] if damage == "truncate" else data)

        monkeypatch.setattr(legacy, "save_file", bad_save_file)
        before = snapshot(tmp_path)
        with pytest.raises(LegacyCheckpointError, match="adapter_model.safetensors: .*(differs|expected)"):
            uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "bad")
        assert snapshot(tmp_path) == before, damage


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("via, code", [("exec", "exec"), ("system", f"{os.name}.system")])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys, via, code):
    marker = tmp_path / "code-ran"
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, pt_overrides={"extra": RunsCodeOnLoad(str(marker), via)})
    before = snapshot(tmp_path)

    assert main(["convert-legacy", str(tmp_path / "ckpt"), "-o", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("uti-peft convert-legacy: error: ")
    assert f"trainable_rows.pt: refused: the file asks to run `{code}`; uti-peft never executes pickled code" in err
    assert "weights_only" not in err and "corrupt" not in err  # never torch's advice to load it unsafely
    assert main(["inspect", str(tmp_path / "ckpt")]) == 2
    assert f"asks to run `{code}`" in capsys.readouterr().err
    assert not marker.exists()
    assert snapshot(tmp_path) == before

    # the fixture is live: an unsafe load of the same file does run its code
    torch.load(tmp_path / "ckpt" / "trainable_rows.pt", weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "old-format"])
def test_truncated_checkpoint_is_refused(tmp_path, zipfile):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, zipfile=zipfile)
    pt = tmp_path / "ckpt" / "trainable_rows.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    before = snapshot(tmp_path)
    with pytest.raises(LegacyCheckpointError, match="truncated") as info:
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "out" / "adapter")
    assert str(pt) in str(info.value)
    assert snapshot(tmp_path) == before  # not even the missing parent "out" was left behind


N = SPACE.num_new_rows
FP32_NO_HEAD = {"lm_head": None, "dtype": "torch.float32"}
MISMATCHES = {  # id: (pt overrides, json overrides, expected message), None: a pt that is not the legacy dict
    "row_end-vs-token-space": (
        {"row_end": SPACE.vocab_size + 1, "embeddings": torch.zeros(N + 1, 64), **FP32_NO_HEAD},
        {},
        r"row_end is 1577 but the token space \(.*token_space.json\) has vocab_size_total 1576",
    ),
    "row_start-vs-token-space": (
        {"row_start": 999, "embeddings": torch.zeros(N + 1, 64), **FP32_NO_HEAD},
        {},
        r"row_start is 999 but the token space .* has text_vocab_size 1000",
    ),
    "json-vs-pt": (
        {},
        {"row_start": 999},
        r"trainable_rows.json disagrees with .*trainable_rows.pt: row_start: 999 in trainable_rows.json vs 1000",
    ),
    "json-has_lm_head": ({}, {"has_lm_head": False}, r"has_lm_head: False in trainable_rows.json vs True"),
    "embeddings-rows": (
        {"embeddings": torch.zeros(N - 1, 64)},
        {},
        r"embeddings has 575 rows but row_end - row_start is 1576 - 1000 = 576",
    ),
    "lm_head-shape": (
        {"lm_head": torch.zeros(N, 32).bfloat16()},
        {},
        r"lm_head is \[576, 32\] torch.bfloat16 but embeddings is \[576, 64\] torch.bfloat16",
    ),
    "dtype-field": (
        {"dtype": "torch.float16"},
        {},
        r"dtype field is 'torch.float16' but the embeddings tensor is torch.bfloat16",
    ),
    "not-a-tensor": ({"embeddings": [[0.0] * 64] * N}, {}, r"embeddings must be a tensor, found list"),
    "base_llm-none": ({"base_llm": None}, {}, r"base_llm must be a non-empty string, found None"),
    "missing-field": ({"lm_head": DROP}, {"has_lm_head": DROP}, r"missing field\(s\) \['lm_head'\]"),
    "not-a-dict": None,
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_inconsistent_checkpoint_is_refused_and_nothing_is_written(tmp_path, case):
    if MISMATCHES[case] is None:  # a pt that holds a bare tensor, not the legacy dict
        write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
        torch.save(torch.zeros(N, 64), tmp_path / "ckpt" / "trainable_rows.pt")
        pt_overrides, json_overrides, message = {}, {}, r"expected a dict of .*, found Tensor"
    else:
        pt_overrides, json_overrides, message = MISMATCHES[case]
        write_legacy_checkpoint(tmp_path / "ckpt", SPACE, pt_overrides=pt_overrides, json_overrides=json_overrides)
    before = snapshot(tmp_path)
    with pytest.raises(LegacyCheckpointError, match=message):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    assert snapshot(tmp_path) == before


def test_mismatched_token_spaces_are_refused_listing_the_differences(tmp_path, capsys):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
    other = SPACE.to_dict()
    other["audio_codec"]["name_or_path"] = "facebook/encodec_24khz"
    other["created_utc"] = "2026-02-01T00:00:00Z"
    (tmp_path / "other_space.json").write_text(json.dumps(other))
    before = snapshot(tmp_path)
    argv = ["convert-legacy", str(tmp_path / "ckpt"), "-o", str(tmp_path / "adapter"),
            "--token-space", str(tmp_path / "other_space.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 field(s) differ" in err
    assert "created_utc: '2026-01-25T19:05:55Z' vs '2026-02-01T00:00:00Z'" in err
    assert "audio_codec.name_or_path: 'facebook/encodec_48khz' vs 'facebook/encodec_24khz'" in err
    assert snapshot(tmp_path) == before

    # no token space anywhere: say how to pass one
    os.remove(tmp_path / "ckpt" / "token_space.json")
    with pytest.raises(LegacyCheckpointError, match="--token-space"):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    (out / "stale.txt").write_text("old")

    assert main(["convert-legacy", str(tmp_path / "ckpt"), "-o", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["adapter_config.json", "stale.txt"]

    before = set(os.listdir(tmp_path))
    assert main(["convert-legacy", str(tmp_path / "ckpt"), "-o", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", WEIGHTS_NAME, "token_space.json"]
    assert set(os.listdir(tmp_path)) == before  # no temporary or replaced directory left beside it

    # --overwrite never deletes what does not look like an earlier output, nor the source itself
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(LegacyCheckpointError, match="not empty and holds no adapter_config.json"):
        uti_peft.convert_legacy(tmp_path / "ckpt", other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(LegacyCheckpointError, match="would replace the input"):
        uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path, overwrite=True)
    with pytest.raises(LegacyCheckpointError, match="holds no .uti-peft-export.json: .* even with --overwrite"):
        uti_peft.export_legacy(out, tmp_path / "ckpt")  # an original checkpoint: no "pass --overwrite" hint
    assert os.path.isfile(tmp_path / "ckpt" / "trainable_rows.pt")


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        with _atomic_output(tmp_path / "a" / "b" / "out", overwrite=False, marker="x") as tmp:
            (open(os.path.join(tmp, "half-written"), "w")).close()
            raise RuntimeError("disk full")
    assert snapshot(tmp_path) == before  # temp dir and the parents made for it are gone

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("previous")
    with pytest.raises(RuntimeError):
        with _atomic_output(tmp_path / "out", overwrite=True, marker="x"):
            raise RuntimeError("interrupted")
    assert snapshot(tmp_path) == ["out", "out/x"] and (tmp_path / "out" / "x").read_text() == "previous"


def test_export_refuses_a_broken_adapter(tmp_path):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
    adapter = uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    weights = os.path.join(adapter, WEIGHTS_NAME)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    # the one adapter-folder check (uti_peft.adapter_folder) refuses it, from the safetensors header alone
    with pytest.raises(uti_peft.RowExtensionError, match=r"adapter_model.safetensors: \d+ bytes but header and tensors"):
        uti_peft.export_legacy(adapter, tmp_path / "back")
    assert not (tmp_path / "back").exists()
    with pytest.raises(uti_peft.RowExtensionError, match=r"nowhere' is not a directory"):
        uti_peft.export_legacy(tmp_path / "nowhere", tmp_path / "back")


# ---------------------------------------------------------------------------------------- inspect
def test_inspect_describes_checkpoints_and_adapters_without_a_model(tmp_path, capsys):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, dtype=torch.float16, lm_head=False, hidden=48)
    (tmp_path / "ckpt" / "eval_step7000.json").write_text(json.dumps({"loss_mean": {"all": 1.0}}))
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    for expected in ("legacy checkpoint (trainable_rows.pt)", "uti-peft/tiny-qwen3", "[1000, 1576)",
                     "hidden_size          48", "float16", SPACE.sha256(), "text, special, image, audio",
                     "eval_step7000.json"):
        assert expected in out, expected
    assert "problem" not in out

    uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "PEFT adapter (ROW_EXTENSION)"
    assert (info["row_range"], info["hidden_size"], info["dtype"]) == ("[1000, 1576)", 48, "float16")
    assert info["token_space_sha256"] == SPACE.sha256() and info["lm_head_rows"] is False
    assert info["problems"] == []

    # inconsistencies are listed, not hidden
    (tmp_path / "ckpt" / "trainable_rows.json").write_text(json.dumps({"row_start": 1000, "row_end": 1500}))
    info = inspect_checkpoint(tmp_path / "ckpt" / "trainable_rows.pt")
    assert any("row_end: 1500 in trainable_rows.json vs 1576" in p for p in info["problems"])


def test_convert_records_a_local_base_that_still_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
    (tmp_path / "bases" / "tiny").mkdir(parents=True)  # a local base, typed relative to the current directory
    assert main(["convert-legacy", "ckpt", "-o", "adapter", "--base-model", "bases/tiny"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "bases" / "tiny")


def test_inspect_of_a_truncated_or_foreign_file_is_an_error(tmp_path, capsys):
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE)
    uti_peft.convert_legacy(tmp_path / "ckpt", tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])  # `head -c 1000`
    for argv in (["inspect", str(tmp_path / "adapter")], ["inspect", str(tmp_path / "adapter"), "--json"]):
        assert main(argv) == 2  # a script must not take a corrupt adapter for a good one
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("uti-peft inspect: error: ") and captured.err.count("\n") == 1
        assert f"{weights}: cannot be read" in captured.err and "1000 bytes" in captured.err
    weights.unlink()
    assert main(["inspect", str(tmp_path / "adapter")]) == 2
    assert f"{weights}: cannot be read (No such file or directory)" in capsys.readouterr().err

    text = tmp_path / "notes.txt"
    text.write_text("hello world, not a checkpoint")
    assert main(["inspect", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"{text}: not a torch checkpoint" in err and "b'hello wo'" in err and "(101)" not in err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_of_a_peft_trained_adapter_feeds_the_legacy_loader(tmp_path, tied):
    """An adapter made with PEFT (not converted) exported for the users' legacy scripts gives the same model."""
    from peft import get_peft_model

    base = build_tiny_qwen3(vocab_rows=BASE_ROWS, tied=tied)
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=SPACE))
    model.save_pretrained(tmp_path / "adapter")
    uti_peft.export_legacy(tmp_path / "adapter", tmp_path / "legacy")

    payload = torch.load(tmp_path / "legacy" / "trainable_rows.pt", weights_only=True)
    assert (payload["lm_head"] is None) == tied  # a tied adapter stores the shared rows once
    assert payload["base_llm"] == SPACE.base_text_model  # the locally built base has no name: the space's base
    legacy = legacy_patch(build_tiny_qwen3(vocab_rows=BASE_ROWS, tied=tied), payload, SPACE)
    loaded = load_converted(tmp_path / "adapter", tied=tied, dtype=torch.float32)
    ids = probe_ids(SPACE)
    assert torch.equal(logits(legacy, ids), logits(loaded, ids))


def test_base_llm_is_compared_with_the_token_space_only_when_it_is_a_model_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "try" / "base").mkdir(parents=True)
    for base_llm, warns in (("Qwen/Qwen2-7B", True), ("try/base", False)):  # a directory's name says nothing
        write_legacy_checkpoint(tmp_path / base_llm.replace("/", "-"), SPACE, base_llm=base_llm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            uti_peft.convert_legacy(tmp_path / base_llm.replace("/", "-"), tmp_path / f"out-{warns}")
        said = [str(w.message) for w in caught if "was built for" in str(w.message)]
        assert said == ([f"{tmp_path / 'Qwen-Qwen2-7B' / 'trainable_rows.pt'}: base_llm is 'Qwen/Qwen2-7B' but the "
                         f"token space ({tmp_path / 'Qwen-Qwen2-7B' / 'token_space.json'}) was built for "
                         "'uti-peft/tiny-qwen3'"] if warns else [])
