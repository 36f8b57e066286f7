"""Constrained generation on a tiny random model: ids stay in range, audio keeps codebook order."""

from __future__ import annotations

import pytest
import torch

from uti_peft.generation import (
    ModalityLogitsProcessor,
    SegmentLogitsProcessor,
    build_prompt,
    decode_image_ids,
    deserialize_audio_ids,
    generate_for_task,
    serialize_audio_codes,
)
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space
from uti_peft.token_space import TokenSpace

TS = tiny_token_space()
# The tiny layout, written out: TEXT 0..999, SPECIAL 1000..1063, IMAGE 1064..1319, AUDIO_CB{k} 1320 + 64k.
TEXT_START, TEXT_END, IMG_START, IMG_END, AUD_START, AUD_END, GEN_TEXT, GEN_IMG, GEN_AUD, PAD = range(1000, 1010)
IMAGE = range(1064, 1320)
CODEBOOKS = [range(1320 + 64 * k, 1384 + 64 * k) for k in range(4)]
TEXT = range(0, 1000)


@pytest.fixture(scope="module")
def model():
    return build_tiny_qwen3(vocab_rows=TS.vocab_size, seed=1)


def allowed_ids(scores):
    return set(torch.nonzero(torch.isfinite(scores)).flatten().tolist())


# ---------------------------------------------------------------------------------------- serialization
def test_audio_serialization_known_sequence():
    codes = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    ids = serialize_audio_codes(TS, codes)
    assert ids == [1321, 1387, 1453, 1519, 1322, 1388, 1454, 1520]
    decoded = deserialize_audio_ids(TS, ids)
    assert decoded.dtype == torch.long and decoded.tolist() == codes.tolist()


def test_audio_round_trip_random_codes():
    codes = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(deserialize_audio_ids(TS, serialize_audio_codes(TS, codes)), codes)


def test_audio_deserialization_rejects_wrong_order_and_partial_frames():
    with pytest.raises(ValueError, match="position 1 is in codebook 2, expected codebook 1"):
        deserialize_audio_ids(TS, [1321, 1453, 1387, 1519])
    with pytest.raises(ValueError, match="3 audio ids"):
        deserialize_audio_ids(TS, [1321, 1387, 1453])
    with pytest.raises(ValueError, match=r"shaped \[4, T\]"):
        serialize_audio_codes(TS, [[1, 2], [3, 4]])


def test_unknown_serialization_is_a_clear_error():
    data = TS.to_dict()
    data["audio_codec"]["serialization"] = "flatten_by_codebook"
    other = TokenSpace(data)
    with pytest.raises(ValueError, match="unsupported audio serialization 'flatten_by_codebook'"):
        serialize_audio_codes(other, [[0], [0], [0], [0]])
    with pytest.raises(ValueError, match="unsupported audio serialization"):
        deserialize_audio_ids(other, [1320, 1384, 1448, 1512])


def test_image_decode_known_sequence():
    assert decode_image_ids(TS, [1064, 1065, 1319]) == [0, 1, 255]
    with pytest.raises(ValueError, match="not an image token"):
        decode_image_ids(TS, [1320])


# ---------------------------------------------------------------------------------------- prompts
def test_prompts_follow_the_training_layouts():
    assert build_prompt(TS, "t2i", [5, 6]) == [TEXT_START, 5, 6, TEXT_END, GEN_IMG, IMG_START]
    assert build_prompt(TS, "t2a", [7]) == [TEXT_START, 7, TEXT_END, GEN_AUD, AUD_START]
    assert build_prompt(TS, "i2t", [0, 255]) == [IMG_START, 1064, 1319, IMG_END, GEN_TEXT, TEXT_START]
    assert build_prompt(TS, "a2t", [[1], [2], [3], [4]]) == [
        AUD_START, 1321, 1386, 1451, 1516, AUD_END, GEN_TEXT, TEXT_START
    ]
    with pytest.raises(ValueError, match="unknown task 'x2y'"):
        build_prompt(TS, "x2y", [])
    with pytest.raises(ValueError, match="outside the text range"):
        build_prompt(TS, "t2i", [5, 1064])


# ---------------------------------------------------------------------------------------- processors
def test_modality_processor_masks_everything_else():
    scores = torch.randn(2, TS.vocab_size + 24)  # a model may have more rows than the token space
    out = ModalityLogitsProcessor(TS, "image", extra_allowed_ids=[IMG_END])(torch.zeros(2, 3, dtype=torch.long), scores)
    assert allowed_ids(out[0]) == allowed_ids(out[1]) == set(IMAGE) | {IMG_END}
    assert torch.equal(out[:, 1064:1320], scores[:, 1064:1320])

    audio = ModalityLogitsProcessor(TS, ["AUDIO_CB2", "special"])(None, torch.zeros(1, TS.vocab_size))
    assert allowed_ids(audio[0]) == set(CODEBOOKS[2]) | set(range(1000, 1064))
    assert allowed_ids(ModalityLogitsProcessor(TS, "audio")(None, torch.zeros(1, TS.vocab_size))[0]) == set(
        range(1320, 1576)
    )
    with pytest.raises(ValueError, match="outside the token space"):
        ModalityLogitsProcessor(TS, "text", extra_allowed_ids=[TS.vocab_size])


def test_segment_processor_audio_cycle_and_end_only_between_frames():
    processor = SegmentLogitsProcessor(TS, "audio", prompt_length=3, max_units=2, min_units=1)
    assert processor.max_new_tokens == 9

    def allowed_at(step):
        input_ids = torch.tensor([[TEXT_START, GEN_AUD, AUD_START] + [CODEBOOKS[i % 4][0] for i in range(step)]])
        return allowed_ids(processor(input_ids, torch.zeros(1, TS.vocab_size))[0])

    assert allowed_at(0) == set(CODEBOOKS[0])  # min_units=1: no empty segment
    assert [allowed_at(s) == set(CODEBOOKS[s % 4]) for s in (1, 2, 3, 5, 6, 7)] == [True] * 6
    assert allowed_at(4) == set(CODEBOOKS[0]) | {AUD_END}
    assert allowed_at(8) == {AUD_END}


def test_segment_processor_leaves_finished_rows_alone():
    processor = SegmentLogitsProcessor(TS, "text", prompt_length=1, max_units=5)
    input_ids = torch.tensor([[GEN_TEXT, 4, TEXT_END, PAD], [GEN_TEXT, 4, 5, 6]])
    out = processor(input_ids, torch.zeros(2, TS.vocab_size))
    assert allowed_ids(out[0]) == set(range(TS.vocab_size))
    assert allowed_ids(out[1]) == set(TEXT) | {TEXT_END}
    with pytest.raises(ValueError, match="0 <= min_units <= max_units"):
        SegmentLogitsProcessor(TS, "text", prompt_length=1, max_units=2, min_units=3)


# ---------------------------------------------------------------------------------------- generation
def test_unconstrained_tiny_model_leaves_the_image_range(model):
    """Control: without the processor the random model does not stay in IMAGE, so the tests below mean something."""
    prompt = torch.tensor([build_prompt(TS, "t2i", [5, 6, 7])])
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=PAD)
    assert any(i not in IMAGE for i in out[0, prompt.shape[1]:].tolist())


@pytest.mark.parametrize("sample", [False, True])
def test_t2i_stays_in_the_image_range(model, sample):
    torch.manual_seed(0)
    result = generate_for_task(model, TS, "t2i", [5, 6, 7], max_units=12, min_units=12, do_sample=sample, top_k=0)
    assert result.prompt_ids == [TEXT_START, 5, 6, 7, TEXT_END, GEN_IMG, IMG_START]
    assert result.finished and result.token_ids[-1] == IMG_END and len(result.token_ids) == 13
    assert all(i in IMAGE for i in result.token_ids[:-1])
    assert result.image_codes == [i - 1064 for i in result.token_ids[:-1]]
    assert result.text_ids is None and result.audio_codes is None


@pytest.mark.parametrize("task,end,min_units,expected_length", [("t2i", IMG_END, 3, 3), ("t2a", AUD_END, 2, 8)])
def test_end_token_comes_as_soon_as_allowed_and_not_before(model, task, end, min_units, expected_length):
    """A huge bias on the end token (transformers' sequence_bias) makes the model want to stop at every
    step; it stops exactly after min_units codes (audio: whole time steps), never earlier."""
    result = generate_for_task(model, TS, task, [9], max_units=40, min_units=min_units, sequence_bias={(end,): 100.0})
    assert result.finished and len(result.token_ids) == expected_length + 1 and result.token_ids[-1] == end


@pytest.mark.parametrize("sample", [False, True])
def test_t2a_respects_codebook_order(model, sample):
    torch.manual_seed(1)
    result = generate_for_task(model, TS, "t2a", [11, 12], max_units=5, do_sample=sample, top_k=0)
    body = result.token_ids[:-1]
    assert result.token_ids[-1] == AUD_END and len(body) % 4 == 0 and 1 <= len(body) // 4 <= 5
    assert all(token_id in CODEBOOKS[position % 4] for position, token_id in enumerate(body))
    assert result.audio_codes.shape == (4, len(body) // 4)
    assert serialize_audio_codes(TS, result.audio_codes) == body


@pytest.mark.parametrize("task,inputs", [("a2t", [[1, 2], [3, 4], [5, 6], [7, 8]]), ("i2t", [0, 17, 255])])
def test_to_text_stays_in_text_until_text_end(model, task, inputs):
    torch.manual_seed(2)
    result = generate_for_task(model, TS, task, inputs, max_units=8, do_sample=True, top_k=0)
    assert result.prompt_ids[-2:] == [GEN_TEXT, TEXT_START]
    assert result.token_ids[-1] == TEXT_END and 1 <= len(result.text_ids) <= 8
    assert result.text_ids == result.token_ids[:-1] and all(i in TEXT for i in result.text_ids)
