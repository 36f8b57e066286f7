"""Train a row-extension adapter (optionally with LoRA) on tokenized JSONL; the same as ``uti-peft train``.

    python scripts/train.py --tiny --data train.jsonl --output-dir out --max-steps 10
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --base Qwen/Qwen3-8B-Base --token-space token_space.json ...
    accelerate launch --config_file scripts/accelerate/fsdp2.yaml --num_processes 8 scripts/train.py --base ... # FSDP2
    torchrun --nproc_per_node 8 scripts/train.py --deepspeed scripts/deepspeed/zero2.json --base ...  # DeepSpeed ZeRO-2

All the logic lives in `uti_peft.training`; ``--help`` lists the options.
"""

import sys

from uti_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
