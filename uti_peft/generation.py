"""Modality-aware generation on the token space.

A model extended with new rows can emit any id at any step; these helpers keep a generated segment
inside its modality: image codes until ``<|img_end|>``, audio codes in codebook order (CB0, CB1, ...,
CB{n-1} per time step, as the token space's ``serialization`` says), text until ``<|text_end|>``.
Prompts follow our users' training layouts, e.g. t2i is
``<|text_start|> text <|text_end|> <|gen_img|> <|img_start|>`` and generation continues from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .token_space import TokenRange, TokenSpace

INTERLEAVED_SERIALIZATION = "flatten_by_time_interleaved_codebooks"

# (segment start, segment end, "generate this modality") special tokens of each modality.
_SEGMENT_TOKENS = {
    "text": ("<|text_start|>", "<|text_end|>", "<|gen_text|>"),
    "image": ("<|img_start|>", "<|img_end|>", "<|gen_img|>"),
    "audio": ("<|aud_start|>", "<|aud_end|>", "<|gen_aud|>"),
}
# Task -> (input modality, output modality).
TASKS = {"t2i": ("text", "image"), "t2a": ("text", "audio"), "i2t": ("image", "text"), "a2t": ("audio", "text")}

AudioCodes = Union[torch.Tensor, Sequence[Sequence[int]]]


# ---------------------------------------------------------------------------------------- audio / image codes
def serialize_audio_codes(token_space: TokenSpace, codes: AudioCodes) -> list[int]:
    """Audio codes ``[n_codebooks, T]`` -> global ids, one time step after another (CB0..CB{n-1} each)."""
    n_codebooks = _audio_codebook_count(token_space)
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.ndim != 2 or codes.shape[0] != n_codebooks:
        raise ValueError(f"audio codes must be shaped [{n_codebooks}, T], got {list(codes.shape)}")
    return [
        token_space.audio_code_to_id(codebook, code)
        for frame in codes.T.tolist()
        for codebook, code in enumerate(frame)
    ]


def deserialize_audio_ids(token_space: TokenSpace, ids: Sequence[int]) -> torch.LongTensor:
    """Global audio ids -> codes ``[n_codebooks, T]``; each id must sit in the codebook its position demands."""
    n_codebooks = _audio_codebook_count(token_space)
    ids = [int(i) for i in ids]
    if len(ids) % n_codebooks:
        raise ValueError(f"{len(ids)} audio ids do not make whole time steps of {n_codebooks} codebooks")
    codes = torch.empty((n_codebooks, len(ids) // n_codebooks), dtype=torch.long)
    for position, token_id in enumerate(ids):
        codebook, code = token_space.id_to_audio_code(token_id)
        step, expected = divmod(position, n_codebooks)
        if codebook != expected:
            raise ValueError(
                f"audio id {token_id} at position {position} is in codebook {codebook}, expected codebook {expected}"
            )
        codes[codebook, step] = code
    return codes


def decode_image_ids(token_space: TokenSpace, ids: Sequence[int]) -> list[int]:
    """Global image ids -> image codes (codebook space)."""
    return [token_space.id_to_image_code(int(i)) for i in ids]


def _audio_codebook_count(token_space: TokenSpace) -> int:
    """Number of audio codebooks, after checking that the serialization is one we implement."""
    codec = token_space.audio_codec
    if not codec:
        raise ValueError(f"{token_space.source}: no audio_codec, so audio cannot be (de)serialized")
    serialization = codec.get("serialization")
    if serialization != INTERLEAVED_SERIALIZATION:
        raise ValueError(
            f"{token_space.source}: unsupported audio serialization {serialization!r}; "
            f"supported: {INTERLEAVED_SERIALIZATION!r}"
        )
    return len(token_space.ranges_of("audio"))


# ---------------------------------------------------------------------------------------- logits processors
class ModalityLogitsProcessor(LogitsProcessor):
    """Restrict every next token to some ranges of the token space, plus a few extra ids.

    ``allowed`` names modalities (``"text"``, ``"image"``, ``"audio"``, ``"special"``) or single ranges
    (``"AUDIO_CB2"``); ``extra_allowed_ids`` adds ids such as an end token. Every other logit, including
    rows of the model beyond the token space, becomes ``-inf``.
    """

    def __init__(
        self, token_space: TokenSpace, allowed: Union[str, Sequence[str]], extra_allowed_ids: Iterable[int] = ()
    ) -> None:
        names = [allowed] if isinstance(allowed, str) else list(allowed)
        self.ranges = [r for name in names for r in _ranges_named(token_space, name)]
        self.extra_allowed_ids = _checked_ids(token_space, extra_allowed_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = _allowed_mask(self.ranges, self.extra_allowed_ids, scores.shape[-1], scores.device)
        return scores.masked_fill(~allowed, -float("inf"))


class SegmentLogitsProcessor(LogitsProcessor):
    """Keep the segment generated after the prompt inside one modality until its end token.

    The segment is made of *units*: a text token, an image code, or an audio time step of ``n``
    codebook ids in codebook order (position ``t`` of the segment is in ``AUDIO_CB{t % n}``). The end
    token (``<|text_end|>``, ``<|img_end|>``, ``<|aud_end|>``) is allowed only between units, once at
    least ``min_units`` are generated, and forced after ``max_units`` (``min_units == max_units`` asks
    for an exact length, e.g. an image tokenizer's fixed number of codes). Rows that already produced
    the end token are left alone, so batched or beam generation can pad them.
    """

    def __init__(
        self, token_space: TokenSpace, modality: str, *, prompt_length: int, max_units: int, min_units: int = 1
    ) -> None:
        if not 0 <= min_units <= max_units or max_units < 1:
            raise ValueError(f"need 0 <= min_units <= max_units and max_units >= 1, got {min_units}, {max_units}")
        self.phases = _segment_phases(token_space, modality)
        self.end_token_id = token_space.special_token_id(_segment_tokens(modality)[1])
        self.prompt_length = prompt_length
        self.max_units = max_units
        self.min_units = min_units

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest segment plus its end token."""
        return self.max_units * len(self.phases) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < 0:
            raise ValueError(f"input of length {input_ids.shape[1]} is shorter than the prompt ({self.prompt_length})")
        unit, phase = divmod(step, len(self.phases))
        ranges: list[TokenRange] = [] if phase == 0 and unit >= self.max_units else self.phases[phase]
        ends = (self.end_token_id,) if phase == 0 and unit >= self.min_units else ()
        allowed = _allowed_mask(ranges, ends, scores.shape[-1], scores.device)
        ended = (input_ids[:, self.prompt_length :] == self.end_token_id).any(dim=1, keepdim=True)
        return scores.masked_fill(~(ended | allowed), -float("inf"))


def _ranges_named(token_space: TokenSpace, name: str) -> list[TokenRange]:
    """A single range by its exact name (``AUDIO_CB1``), else all ranges of a modality (``audio``)."""
    ranges = token_space.ranges
    return [ranges[name]] if name in ranges else token_space.ranges_of(name)


def _segment_phases(token_space: TokenSpace, modality: str) -> list[list[TokenRange]]:
    """Allowed ranges at each position of a unit: one phase per codebook for audio, one phase otherwise."""
    if modality == "audio":
        _audio_codebook_count(token_space)  # the phases below are the interleaved serialization
        return [[codebook] for codebook in token_space.ranges_of("audio")]
    return [token_space.ranges_of(modality)]


def _checked_ids(token_space: TokenSpace, ids: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(int(i) for i in ids)
    bad = [i for i in ids if not 0 <= i < token_space.vocab_size]
    if bad:
        raise ValueError(f"ids {bad} are outside the token space (0..{token_space.vocab_size - 1})")
    return ids


def _allowed_mask(
    ranges: Sequence[TokenRange], ids: Sequence[int], width: int, device: torch.device
) -> torch.Tensor:
    """Boolean ``[width]`` mask of the ids in ``ranges`` or ``ids`` (clipped to the score width)."""
    mask = torch.zeros(width, dtype=torch.bool, device=device)
    for r in ranges:
        mask[r.start : r.end + 1] = True
    mask[[i for i in ids if i < width]] = True
    return mask


# ---------------------------------------------------------------------------------------- prompts and generation
@dataclass
class GenerationResult:
    """What :func:`generate_for_task` produced.

    ``token_ids`` are the generated global ids (including the end token when reached); exactly one of
    ``text_ids`` (for the text tokenizer), ``image_codes`` or ``audio_codes`` (``[n_codebooks, T]``)
    holds the decoded segment, without its end token.
    """

    task: str
    prompt_ids: list[int]
    token_ids: list[int]
    finished: bool
    text_ids: list[int] | None = None
    image_codes: list[int] | None = None
    audio_codes: torch.LongTensor | None = None


def build_prompt(token_space: TokenSpace, task: str, inputs: Any) -> list[int]:
    """Prompt ids for a task, in the training layout.

    ``inputs`` is text ids (t2i, t2a), image codes (i2t) or audio codes ``[n_codebooks, T]`` (a2t).
    t2i gives ``<|text_start|> text <|text_end|> <|gen_img|> <|img_start|>``; the others alike.
    """
    source, target = _task(task)
    start, end, _ = _segment_tokens(source)
    output_start, _, generate = _segment_tokens(target)
    names = (start, end, generate, output_start)
    start_id, end_id, generate_id, output_start_id = (token_space.special_token_id(n) for n in names)
    return [start_id, *_encode(token_space, source, inputs), end_id, generate_id, output_start_id]


def generate_for_task(
    model: Any,
    token_space: TokenSpace,
    task: str,
    inputs: Any,
    *,
    max_units: int,
    min_units: int = 1,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Build the task's prompt, generate one constrained output segment, and decode it.

    ``max_units`` / ``min_units`` bound the output in text tokens, image codes or audio time steps;
    the end token is forced once ``max_units`` is reached. ``generate_kwargs`` go to ``model.generate``
    (e.g. ``do_sample=True, top_k=50``); the prompt is a single, unpadded sequence.
    """
    _, target = _task(task)
    prompt_ids = build_prompt(token_space, task, inputs)
    processor = SegmentLogitsProcessor(
        token_space, target, prompt_length=len(prompt_ids), max_units=max_units, min_units=min_units
    )
    prompt = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=processor.max_new_tokens,
        eos_token_id=processor.end_token_id,
        pad_token_id=token_space.pad_token_id,
        **generate_kwargs,
    )
    token_ids = output[0, len(prompt_ids) :].tolist()
    finished = processor.end_token_id in token_ids
    segment = token_ids[: token_ids.index(processor.end_token_id)] if finished else token_ids
    result = GenerationResult(task=task, prompt_ids=prompt_ids, token_ids=token_ids, finished=finished)
    if target == "text":
        result.text_ids = segment
    elif target == "image":
        result.image_codes = decode_image_ids(token_space, segment)
    else:
        result.audio_codes = deserialize_audio_ids(token_space, segment)
    return result


def _task(task: str) -> tuple[str, str]:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}") from None


def _segment_tokens(modality: str) -> tuple[str, str, str]:
    try:
        return _SEGMENT_TOKENS[modality]
    except KeyError:
        raise ValueError(f"no segment tokens for modality {modality!r}; known: {sorted(_SEGMENT_TOKENS)}") from None


def _encode(token_space: TokenSpace, modality: str, inputs: Any) -> list[int]:
    """Input of one modality -> global ids (text ids are checked to be text)."""
    if modality == "image":
        return [token_space.image_code_to_id(int(code)) for code in inputs]
    if modality == "audio":
        return serialize_audio_codes(token_space, inputs)
    ids = [int(i) for i in inputs]
    text_ranges = token_space.ranges_of("text")
    bad = [i for i in ids if not any(i in r for r in text_ranges)]
    if bad:
        raise ValueError(f"text input has ids outside the text range (0..{token_space.text_vocab_size - 1}): {bad[:5]}")
    return ids
