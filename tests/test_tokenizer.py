"""add_modality_tokens on a tiny WordLevel tokenizer built locally (no download)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from uti_peft.tiny import build_token_space, tiny_token_space
from uti_peft.token_space import TokenSpace
from uti_peft.tokenizer import add_modality_tokens, modality_token_names

TS = tiny_token_space()


def word_tokenizer(n_words: int = 1000) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(n_words - 1)}
    vocab["[UNK]"] = n_words - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def add_modality_tokens_to_fresh() -> PreTrainedTokenizerFast:
    tokenizer = word_tokenizer()
    add_modality_tokens(tokenizer, TS)
    return tokenizer


def small_space_data() -> dict:
    return build_token_space(10, special_size=12, image_size=3, n_codebooks=2, codebook_size=2).to_dict()


def test_every_new_id_decodes_to_its_name():
    tokenizer = word_tokenizer()
    names = add_modality_tokens(tokenizer, TS)
    assert len(tokenizer) == TS.vocab_size == 1576
    assert tokenizer.convert_ids_to_tokens(list(range(1000, 1576))) == names
    # A few written out: named specials, unused SPECIAL fillers, image and audio codes.
    assert names[0] == "<|text_start|>" and names[9] == "<|pad_mm|>"
    assert names[10] == "<|special_10|>" and names[63] == "<|special_63|>"
    assert names[64] == "<|img_0|>" and names[319] == "<|img_255|>"
    assert names[320] == "<|aud0_0|>" and names[385] == "<|aud1_1|>" and names[575] == "<|aud3_63|>"


def test_mixed_sequence_decodes_readably_and_encodes_back():
    tokenizer = add_modality_tokens_to_fresh()
    ids = [1000, 5, 6, 1001, 1007, 1002, 1064 + 7, 1064 + 200, 1003, 1320 + 3, 1384 + 9]
    text = tokenizer.decode(ids)
    assert text == "<|text_start|> w5 w6 <|text_end|> <|gen_img|> <|img_start|> <|img_7|> <|img_200|> <|img_end|> " \
                   "<|aud0_3|> <|aud1_9|>"
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "w5 w6"


@pytest.mark.parametrize("n_words", [999, 1001])
def test_tokenizer_of_the_wrong_size_is_refused_before_adding(n_words):
    tokenizer = word_tokenizer(n_words)
    with pytest.raises(ValueError, match=f"has {n_words} tokens but .*text_vocab_size is 1000"):
        add_modality_tokens(tokenizer, TS)
    assert len(tokenizer) == n_words


def test_adding_twice_is_refused():
    tokenizer = add_modality_tokens_to_fresh()
    with pytest.raises(ValueError, match="has 1576 tokens"):
        add_modality_tokens(tokenizer, TS)


def test_name_clash_with_the_text_vocabulary_is_refused():
    vocab = {f"w{i}": i for i in range(998)}
    vocab.update({"[UNK]": 998, "<|img_3|>": 999})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"already has tokens named \['<\|img_3\|>'\]"):
        add_modality_tokens(tokenizer, TS)
    assert len(tokenizer) == 1000


def test_names_follow_the_token_space_layout():
    assert modality_token_names(TokenSpace(small_space_data())) == [
        "<|text_start|>", "<|text_end|>", "<|img_start|>", "<|img_end|>", "<|aud_start|>", "<|aud_end|>",
        "<|gen_text|>", "<|gen_img|>", "<|gen_aud|>", "<|pad_mm|>", "<|special_10|>", "<|special_11|>",
        "<|img_0|>", "<|img_1|>", "<|img_2|>", "<|aud0_0|>", "<|aud0_1|>", "<|aud1_0|>", "<|aud1_1|>",
    ]


def test_ids_in_no_range_get_unused_names():
    data = small_space_data()
    data["ranges"]["SPECIAL"] = {"start": 10, "end": 19, "size": 10}  # leaves 20, 21 outside every range
    names = modality_token_names(TokenSpace(data))
    assert names[9:13] == ["<|pad_mm|>", "<|unused_20|>", "<|unused_21|>", "<|img_0|>"]


def test_a_special_token_named_like_a_code_is_refused():
    data = small_space_data()
    data["special_tokens"]["<|img_0|>"] = 20
    with pytest.raises(ValueError, match=r"several ids would be named \['<\|img_0\|>'\]"):
        add_modality_tokens(word_tokenizer(10), TokenSpace(data))


def test_added_tokens_survive_save_and_load(tmp_path):
    add_modality_tokens_to_fresh().save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert len(loaded) == TS.vocab_size
    assert loaded.decode([1002, 1064 + 42, 1512 + 63, 1003]) == "<|img_start|> <|img_42|> <|aud3_63|> <|img_end|>"


def test_on_the_tiny_qwen3_tokenizer_modality_tokens_are_special_and_round_trip():
    from uti_peft.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    names = add_modality_tokens(tokenizer, TS)
    assert len(tokenizer) == TS.vocab_size
    # the pad token is the token space's, as the model config's pad_token_id (not Qwen's <|endoftext|>)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad_mm|>", TS.pad_token_id)
    assert all(tokenizer.added_tokens_decoder[i].special for i in range(1000, 1576))
    text_ids = tokenizer("The cat", add_special_tokens=False).input_ids
    ids = [1000, *text_ids, 1001, 1007, 1002, 1064 + 7, 1064 + 200, 1003, 1320 + 3, 1384 + 9]
    text = tokenizer.decode(ids)  # byte-level: no spaces are inserted around special tokens
    assert text == "<|text_start|>The cat<|text_end|><|gen_img|><|img_start|><|img_7|><|img_200|><|img_end|>" \
                   "<|aud0_3|><|aud1_9|>"
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The cat"
    assert tokenizer.convert_tokens_to_ids(names) == list(range(1000, 1576))
