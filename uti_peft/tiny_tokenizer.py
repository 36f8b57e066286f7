"""The tiny model's tokenizer: a small byte-level BPE built like Qwen3's, trained locally (no download).

Qwen3's tokenizer is a byte-level BPE (151,643 tokens) with Qwen2's pre-tokenizer (NFC, the Qwen2 split regex,
byte-level mapping without a prefix space) followed by 26 added tokens (``<|endoftext|>`` … ``</think>``), so
its text vocabulary is 151,669 ids. `build_tiny_tokenizer` is the same thing at a small size: a BPE trained
with the `tokenizers` library on the short English text below, then Qwen3's 26 added tokens on the last ids,
loaded by transformers' own `Qwen2Tokenizer` class (the class a real Qwen3 checkpoint loads as), with Qwen3-Base's
eos/pad (``<|endoftext|>``) and a ChatML chat template. Training takes ~20 ms and is deterministic (no random
choice: ties between pairs are broken by the pairs themselves); it is done once per process and cached.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Qwen3's added tokens, in id order (151,643 … 151,668 on Qwen3); the tool and think tags are not special there.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

# Qwen's ChatML (Qwen3's template without its tool-call and thinking branches).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The training text: plain English about what the tiny model stands in for. Changing it changes the vocabulary.
CORPUS = """\
A discrete-token multimodal language model reads and writes text, images and audio as one sequence of ids.
The text tokenizer keeps its vocabulary; image and audio codes get new ids after the last text token.
An image is cut into patches, and a quantizer turns each patch into one of 8,192 codes.
A sound is encoded by a neural codec into four codebooks of 1,024 codes each, interleaved step by step.
Every new id needs a row in the input embedding and a row in the output head, so the model learns them.
The adapter stores only those new rows: the base model stays as it was, frozen and shared.
Training updates the rows (and, if you want, a small LoRA) while the rest of the network does not change.
Loading the adapter resizes a fresh base, copies its rows in, and gives the same logits as before.
Merging writes a plain checkpoint with a tokenizer that knows every new token, ready for a serving engine.
Hello! How are you today? I am fine, thank you. What would you like to draw, hear or read?
Please describe this picture in one sentence. The cat sits on a red chair near the open window.
Generate a short sound: a bell rings twice, then the wind blows through the tall green trees.
Translate the caption into speech, then write the words you heard back as text.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
Numbers are written digit by digit: 0 1 2 3 4 5 6 7 8 9, so 2026 is four tokens and 3.14 is four more.
Questions, answers, lists and code all use the same bytes: (a), [b], {c}, "quoted", 'single', x = y + 1;
def main(): return print("hello world") # a line of Python is text too
When the model is asked for an image it should answer with image codes only, then the end-of-image token.
When it is asked for audio it should answer with codes of the first codebook, then the second, and so on.
Small models are good for tests: they build in a blink, run on any computer, and need no download.
A real model has many layers, a large hidden size, and a vocabulary of more than one hundred thousand tokens.
The same steps work there: save the rows, push them to the hub, load them anywhere, merge them for serving.
Some users train for thousands of steps on many machines; others only try the demo on a laptop.
Good logs show the loss of each task, how many examples were cut, and which tokens were scored.
The weather is nice in spring and autumn; summer is hot and winter is cold, with snow in the mountains.
People talk, sing, laugh and listen; they look at photos, paint pictures and watch films together.
Children play football in the park while their parents read newspapers on wooden benches.
Music has rhythm, melody and harmony; a piano, a violin and a drum each sound different.
Cooking dinner: chop onions, boil water, add salt and pasta, then serve with cheese and fresh basil.
Scientists measure, compare and explain; engineers design, build, test and repair machines.
Yesterday it rained, tomorrow it will be sunny, and next week we travel by train to the coast.
Libraries lend books, maps, journals and recordings; museums keep paintings, sculptures and old tools.
"""


def build_tiny_tokenizer(text_vocab_size: int = 1000) -> Any:
    """A fresh Qwen3-style tokenizer with ``text_vocab_size`` tokens (BPE tokens, then Qwen3's 26 added tokens).

    Returns a new `transformers.Qwen2Tokenizer` each call (callers may add tokens to it); the trained BPE is cached.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe(text_vocab_size - len(QWEN3_ADDED_TOKENS))
    tokenizer = Qwen2Tokenizer(
        vocab=json.loads(vocab), merges=[tuple(pair) for pair in json.loads(merges)], unk_token=None,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=4096,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    # the constructor added the eos/pad token; the others follow in Qwen3's order
    tokenizer.add_tokens([
        AddedToken(token, special=token not in _NOT_SPECIAL, normalized=False)
        for token in QWEN3_ADDED_TOKENS if token not in tokenizer.get_vocab()
    ])
    ids = tokenizer.convert_tokens_to_ids(list(QWEN3_ADDED_TOKENS))
    if len(tokenizer) != text_vocab_size or ids != list(range(text_vocab_size - len(ids), text_vocab_size)):
        raise RuntimeError(f"the tiny tokenizer has {len(tokenizer)} tokens (added tokens at {ids[0]}…), expected "
                           f"{text_vocab_size} with the added tokens last")
    return tokenizer


@functools.lru_cache(maxsize=4)
def _trained_bpe(bpe_size: int) -> tuple[str, str]:
    """The vocabulary and merges (as JSON text, immutable) of a byte-level BPE of ``bpe_size`` tokens on `CORPUS`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    if len(model["vocab"]) != bpe_size:
        raise ValueError(f"the tiny tokenizer's corpus gives {len(model['vocab'])} BPE tokens, not {bpe_size}: "
                         f"text_vocab_size must be between {len(alphabet) + len(QWEN3_ADDED_TOKENS)} and what the "
                         "corpus can merge")
    return json.dumps(model["vocab"]), json.dumps(model["merges"])
