"""Write examples/tiny_{train,eval}.jsonl: tokenized samples of the four tasks (t2i, t2a, i2t, a2t) over the tiny
token space, in our users' JSONL format, so that ``uti-peft train --tiny`` and ``eval`` can be tried offline.

    python scripts/make_tiny_data.py [OUT_DIR]      (default: examples/)

Deterministic (seeded); tests/test_examples.py checks the shipped files are what this writes.
"""

import json
import os
import random
import sys

from uti_peft.generation import build_prompt, serialize_audio_codes
from uti_peft.tiny import tiny_token_space

TASKS = {"t2i": ("text", "image"), "t2a": ("text", "audio"), "i2t": ("image", "text"), "a2t": ("audio", "text")}
END_TOKENS = {"text": "<|text_end|>", "image": "<|img_end|>", "audio": "<|aud_end|>"}


def _units(space, modality: str, rng: random.Random) -> object:
    if modality == "text":
        return [rng.randrange(space.text_vocab_size) for _ in range(rng.randint(4, 12))]
    if modality == "image":
        return [rng.randrange(space.ranges["IMAGE"].size) for _ in range(16)]
    codebooks = len(space.ranges_of("audio"))
    steps = rng.randint(3, 6)
    return [[rng.randrange(space.ranges["AUDIO_CB0"].size) for _ in range(steps)] for _ in range(codebooks)]


def _ids(space, modality: str, units: object) -> list[int]:
    if modality == "image":
        return [space.image_code_to_id(code) for code in units]
    if modality == "audio":
        return serialize_audio_codes(space, units)
    return list(units)


def example(space, task: str, index: int, rng: random.Random) -> dict:
    source, target = TASKS[task]
    prompt = build_prompt(space, task, _units(space, source, rng))
    output = [*_ids(space, target, _units(space, target, rng)), space.special_token_id(END_TOKENS[target])]
    return {"id": f"tiny_{task}_{index}", "task": task, "input_ids": prompt + output,
            "labels": [-100] * len(prompt) + output}


def main(out_dir: str = "examples") -> None:
    space = tiny_token_space()
    for split, count, seed in (("train", 8, 0), ("eval", 2, 1)):
        rng = random.Random(seed)
        rows = [example(space, task, i, rng) for i in range(count) for task in TASKS]
        with open(os.path.join(out_dir, f"tiny_{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
