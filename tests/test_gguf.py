"""llama.cpp: a merged tiny checkpoint converts to GGUF with llama.cpp's own ``convert_hf_to_gguf.py``, and the file
holds every new token (a CONTROL token named as the tokenizer names it), the token space's pad, the chat template
and the extended matrices, as the ``gguf`` package reads them.

Skipped unless the converter is there (llama.cpp is never downloaded here): set ``LLAMA_CPP_CONVERTER`` to its
``convert_hf_to_gguf.py`` (in a llama.cpp checkout, or ``vendor/llama.cpp/`` of the llama-cpp-python sdist:
``pip download --no-deps --no-binary :all: llama-cpp-python``), or put it on PATH; it needs ``gguf`` and
``sentencepiece``. The tiny tokenizer's pre-tokenizer hash is unknown to the converter (any vocabulary of its own
is), so the test first checks that the converter refuses it as is, then converts through ``gguf_convert.py``, which
declares the pre-tokenizer ``qwen2`` (what the tiny tokenizer uses) only for that refusal, and says so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import uti_peft
from uti_peft.merge import merge_adapter
from uti_peft.tiny import build_tiny_qwen3, build_tiny_tokenizer
from uti_peft.tokenizer import modality_token_names

from conftest import train_steps

CONVERTER = os.environ.get("LLAMA_CPP_CONVERTER") or shutil.which("convert_hf_to_gguf.py")
WRAPPER = Path(__file__).with_name("gguf_convert.py")
CONTROL = 3  # llama.cpp's token type for special tokens (gguf.TokenType.CONTROL)

pytestmark = [
    pytest.mark.skipif(not CONVERTER, reason="llama.cpp's convert_hf_to_gguf.py not found (LLAMA_CPP_CONVERTER)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None, reason="the converter needs sentencepiece"),
]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, token_space) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    build_tiny_qwen3().save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
    train_steps(model, token_space)
    model.save_pretrained(root / "adapter")
    return Path(merge_adapter(root / "base", root / "adapter", root / "merged", progress=False))


def convert(merged: Path, out: Path, outtype: str, *declare: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(WRAPPER), CONVERTER, *declare, str(merged), "--outfile", str(out),
               "--outtype", outtype]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_the_converter_refuses_the_tiny_vocabulary_as_is(merged, tmp_path):
    run = convert(merged, tmp_path / "model.gguf", "f32")
    assert run.returncode != 0 and "BPE pre-tokenizer was not recognized" in run.stderr
    assert not (tmp_path / "model.gguf").exists() or (tmp_path / "model.gguf").stat().st_size == 0


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_a_merged_checkpoint_converts_with_every_new_token(merged, tmp_path, token_space, outtype):
    from gguf import GGUFReader

    run = convert(merged, tmp_path / "model.gguf", outtype, "--declare-pre", "qwen2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "declared pre-tokenizer 'qwen2'" in run.stderr  # the one thing the wrapper did, said
    gguf = GGUFReader(tmp_path / "model.gguf")
    field = {name: value.contents() for name, value in gguf.fields.items()}
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert len(tokens) == token_space.vocab_size == 1576
    assert tokens[token_space.text_vocab_size:] == modality_token_names(token_space)
    assert set(types[token_space.text_vocab_size:]) == {CONTROL}  # detokenized only with special=True
    assert field["tokenizer.ggml.padding_token_id"] == token_space.pad_token_id  # <|pad_mm|>, as config.json
    assert field["tokenizer.ggml.eos_token_id"] == tokens.index("<|endoftext|>")
    assert field["tokenizer.chat_template"] == build_tiny_tokenizer().chat_template
    assert (field["general.architecture"], field["qwen3.block_count"]) == ("qwen3", 2)
    tensors = {t.name: t for t in gguf.tensors}
    for name in ("token_embd.weight", "output.weight"):  # GGUF lists dimensions innermost first
        assert list(tensors[name].shape) == [64, token_space.vocab_size]
    assert len(tensors) == len(load_file(merged / "model.safetensors"))
    if outtype == "f32":  # the merged rows themselves, new ones included
        weights = load_file(merged / "model.safetensors")
        for name, key in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
            assert torch.equal(torch.from_numpy(tensors[name].data.copy()), weights[key])
