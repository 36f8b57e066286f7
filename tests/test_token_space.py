"""TokenSpace: the users' token_space.json format, its validation, digest and id helpers."""

from __future__ import annotations

import copy
import json

import pytest

from uti_peft import TokenSpace, TokenSpaceError
from uti_peft.tiny import build_token_space, tiny_token_space


@pytest.fixture
def real_shaped() -> TokenSpace:
    return build_token_space(151_669)


def test_real_sizes(real_shaped):
    assert real_shaped.text_vocab_size == 151_669
    assert real_shaped.vocab_size == 164_021
    assert real_shaped.num_new_rows == 12_352
    sizes = {name: r.size for name, r in real_shaped.ranges.items()}
    assert sizes == {"TEXT": 151_669, "SPECIAL": 64, "IMAGE": 8192, **{f"AUDIO_CB{i}": 1024 for i in range(4)}}
    assert real_shaped.ranges["AUDIO_CB3"].end == 164_020
    assert real_shaped.pad_token_id == real_shaped.special_tokens["<|pad_mm|>"] == 151_678
    assert real_shaped.modalities == ["text", "special", "image", "audio"]


def test_round_trip_keeps_unknown_fields(real_shaped, tmp_path):
    data = real_shaped.to_dict()
    data["future_field"] = {"nested": [1, 2, {"x": None}]}
    data["audio_codec"]["target_bandwidth"] = 6.0
    end = data["vocab_size_total"]
    data["ranges"]["VIDEO"] = {"start": end, "end": end + 9, "size": 10}
    data["vocab_size_total"] = end + 10
    space = TokenSpace(data)
    space.save(tmp_path / "ts.json")
    assert json.loads((tmp_path / "ts.json").read_text()) == data
    assert TokenSpace.from_file(tmp_path / "ts.json").to_dict() == data
    assert space.modalities[-1] == "video"
    assert space.ranges_of("video")[0].size == 10


def test_sha256_is_stable_and_key_order_free(real_shaped):
    data = real_shaped.to_dict()
    reordered = dict(reversed(list(data.items())))
    assert list(reordered) != list(data)
    assert TokenSpace(reordered).sha256() == real_shaped.sha256()
    changed = copy.deepcopy(data)
    changed["created_utc"] = "2027-01-01T00:00:00Z"
    assert TokenSpace(changed).sha256() != real_shaped.sha256()
    assert len(real_shaped.sha256()) == 64


def _mutate(space: TokenSpace, edit) -> dict:
    data = space.to_dict()
    edit(data)
    return data


INVALID = {
    "overlap": (lambda d: d["ranges"]["IMAGE"].update(start=d["ranges"]["IMAGE"]["start"] - 1,
                                                      size=d["ranges"]["IMAGE"]["size"] + 1),
                ["ranges.SPECIAL", "overlaps ranges.IMAGE"]),
    "size": (lambda d: d["ranges"]["IMAGE"].update(size=8000), ["ranges.IMAGE.size is 8000", "8192"]),
    "text_not_at_0": (lambda d: d["ranges"]["TEXT"].update(start=1, size=151_668), ["ranges.TEXT.start must be 0", "1"]),
    "text_size": (lambda d: d.update(text_vocab_size=151_000), ["ranges.TEXT.size is 151669", "text_vocab_size is 151000"]),
    "total": (lambda d: d.update(vocab_size_total=164_000), ["vocab_size_total is 164000", "164021"]),
    "special_outside": (lambda d: d["special_tokens"].update({"<|pad_mm|>": 5}), ["<|pad_mm|>", "is 5", "SPECIAL"]),
    "codebook_count": (lambda d: d["audio_codec"].update(n_codebooks=8), ["n_codebooks is 8", "4 AUDIO_CB"]),
    "codebook_size": (lambda d: d["audio_codec"].update(codebook_size=2048), ["AUDIO_CB0.size is 1024", "2048"]),
    "image_codebook": (lambda d: d["image_tokenizer"].update(codebook_size=16384), ["16384", "IMAGE.size is 8192"]),
    "missing_text": (lambda d: d["ranges"].pop("TEXT"), ["ranges.TEXT is missing"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_validate_rejects(real_shaped, case):
    edit, fragments = INVALID[case]
    with pytest.raises(TokenSpaceError) as info:
        TokenSpace(_mutate(real_shaped, edit))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(TokenSpaceError, match="missing.json: token space file not found"):
        TokenSpace.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenSpaceError, match="bad.json: not valid JSON"):
        TokenSpace.from_file(tmp_path / "bad.json")


def test_pad_id_falls_back_to_zero(real_shaped):
    space = TokenSpace(_mutate(real_shaped, lambda d: d["special_tokens"].pop("<|pad_mm|>")))
    assert space.pad_token_id == 0


def test_image_codes_round_trip(real_shaped):
    image = real_shaped.ranges["IMAGE"]
    ids = [real_shaped.image_code_to_id(code) for code in range(image.size)]
    assert ids == list(range(image.start, image.end + 1))
    assert [real_shaped.id_to_image_code(i) for i in ids] == list(range(image.size))
    with pytest.raises(ValueError, match="image code 8192 out of range"):
        real_shaped.image_code_to_id(8192)
    with pytest.raises(ValueError, match="not an image token"):
        real_shaped.id_to_image_code(5)


def test_audio_codes_round_trip(real_shaped):
    seen = set()
    for codebook, r in enumerate(real_shaped.ranges_of("audio")):
        assert r == real_shaped.ranges[f"AUDIO_CB{codebook}"]
        for code in (0, 1, 1023):
            token_id = real_shaped.audio_code_to_id(codebook, code)
            assert token_id == r.start + code
            assert real_shaped.id_to_audio_code(token_id) == (codebook, code)
            seen.add(token_id)
    assert len(seen) == 12
    with pytest.raises(ValueError, match="codebook 4 out of range"):
        real_shaped.audio_code_to_id(4, 0)
    with pytest.raises(ValueError, match="not an audio token"):
        real_shaped.id_to_audio_code(real_shaped.ranges["IMAGE"].start)


def test_modality_of_id(real_shaped):
    assert real_shaped.modality_of_id(0) == "text"
    assert real_shaped.modality_of_id(151_669) == "special"
    assert real_shaped.modality_of_id(159_925) == "audio"
    assert real_shaped.modality_of_id(164_021) is None


def test_the_one_resolver_prefers_the_given_space_and_checks_it_against_the_directory(tmp_path):
    from uti_peft.token_space import resolve_token_space

    space = tiny_token_space()
    assert resolve_token_space(None, tmp_path) is None  # nothing given, nothing in the directory
    space.save(tmp_path / "token_space.json")
    assert resolve_token_space(None, tmp_path).sha256() == space.sha256()
    other = TokenSpace({**space.to_dict(), "version": "another"}, source="other")
    assert resolve_token_space(other, tmp_path).to_dict()["version"] == "another"  # given wins
    with pytest.raises(TokenSpaceError, match=r"differs from .*token_space.json: 1 field\(s\) differ .*version"):
        resolve_token_space(other, tmp_path, must_agree=True)
    assert resolve_token_space(str(tmp_path / "token_space.json"), tmp_path, must_agree=True).sha256() == space.sha256()
