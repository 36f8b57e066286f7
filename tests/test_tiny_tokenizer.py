"""The embedded default's tokenizer: a Qwen3-style byte-level BPE of 1,000 tokens, built locally, fast and the same
in every process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from transformers import AutoTokenizer, Qwen2Tokenizer

from uti_peft.tiny import build_tiny_tokenizer, tiny_token_space
from uti_peft.tiny_tokenizer import CORPUS, QWEN3_ADDED_TOKENS, _trained_bpe

FINGERPRINT = "import hashlib; from uti_peft.tiny import build_tiny_tokenizer; " \
              "print(hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"


def test_it_is_a_qwen3_style_tokenizer_of_the_tiny_text_vocabulary():
    tokenizer = build_tiny_tokenizer()
    assert type(tokenizer) is Qwen2Tokenizer  # the class a real Qwen3 checkpoint loads as
    assert len(tokenizer) == tiny_token_space().text_vocab_size == 1000
    # Qwen3's 26 added tokens on the last ids, as on Qwen3 (151,643 ... 151,668)
    assert tokenizer.convert_ids_to_tokens(list(range(974, 1000))) == list(QWEN3_ADDED_TOKENS)
    special = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    assert special["<|im_start|>"] and special["<|endoftext|>"] and not special["<think>"]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    # byte-level: 256 single-byte tokens first, so any text encodes and decodes exactly, unknown scripts included
    text = "Hello! Describe this picture: 3.14 ünïcode 你好\n\ttabs"
    ids = tokenizer(text).input_ids
    assert max(ids) < 974 and tokenizer.decode(ids) == text
    assert len(tokenizer("2026", add_special_tokens=False).input_ids) == 4  # Qwen2's split: one digit per token
    assert len(tokenizer(" the picture").input_ids) < len(" the picture")  # merges learned from the corpus


def test_chat_template_is_chatml():
    chat = build_tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_saved_and_loaded_by_auto_tokenizer_it_is_the_same(tmp_path):
    built = build_tiny_tokenizer()
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is Qwen2Tokenizer and len(loaded) == 1000
    assert loaded.backend_tokenizer.to_str() == built.backend_tokenizer.to_str()
    assert loaded.chat_template == built.chat_template


def test_each_call_gives_a_fresh_tokenizer_from_one_cached_training():
    first = build_tiny_tokenizer()
    hits = _trained_bpe.cache_info().hits
    first.add_tokens(["<|mine|>"])
    second = build_tiny_tokenizer()
    assert _trained_bpe.cache_info().hits == hits + 1  # the BPE is trained once per process
    assert len(second) == 1000 and len(first) == 1001


def test_the_build_is_deterministic_across_processes():
    here = hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    for env in ({"PYTHONHASHSEED": "1", "RAYON_NUM_THREADS": "1"}, {"PYTHONHASHSEED": "12345"}):
        run = subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env}, check=True)
        assert run.stdout.strip() == here


def test_other_sizes_and_the_corpus_limit():
    assert len(build_tiny_tokenizer(600)) == 600
    try:
        build_tiny_tokenizer(100_000)
    except ValueError as exc:
        assert "BPE tokens, not 99974" in str(exc)
    else:
        raise AssertionError("a vocabulary larger than the corpus can give was built")
    assert "picture" in CORPUS
