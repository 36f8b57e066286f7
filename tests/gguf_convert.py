"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a checkpoint, optionally declaring its BPE pre-tokenizer.

    python gguf_convert.py CONVERTER [--declare-pre NAME] CONVERTER_ARGS...

The converter names a BPE tokenizer's pre-tokenizer by hashing how it encodes a fixed text; a vocabulary it has
never seen (the tiny 1,000-token BPE) is refused with "BPE pre-tokenizer was not recognized", whatever its
pre-tokenizer. With ``--declare-pre qwen2`` and only in that case, this script answers ``qwen2`` instead (the tiny
tokenizer uses Qwen2's pre-tokenizer, which the converter detects for the real Qwen3 vocabulary) and says so on
stderr; a recognised hash is left as the converter finds it. Nothing else of the converter is changed.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    converter, rest = argv[0], argv[1:]
    declared = None
    if rest[:1] == ["--declare-pre"]:
        declared, rest = rest[1], rest[2:]
    root = os.path.dirname(os.path.abspath(converter))
    sys.path[:0] = [root, os.path.join(root, "gguf-py")]  # as the converter does: its own gguf-py first
    if declared:
        from conversion.base import TextModel  # the converter's own module, reused when it runs below

        detect = TextModel.get_vocab_base_pre

        def declare(self, tokenizer) -> str:
            try:
                return detect(self, tokenizer)
            except NotImplementedError:
                print(f"gguf_convert: the converter does not know this tokenizer's hash; declared pre-tokenizer "
                      f"{declared!r}", file=sys.stderr)
                return declared

        TextModel.get_vocab_base_pre = declare
    sys.argv = [converter, *rest]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
