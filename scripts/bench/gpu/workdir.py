"""The checkpoints every case reads, built once by the parent on the CPU (in ``/dev/shm`` when it has room):
the full-depth base, the adapter, the merged checkpoint and the legacy ``trainable_rows.pt``."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ..params import DTYPE, Paths, Shape
from ..workdir import build_base, qwen3_config
from .params import GpuParams, PARAMS_NAME, SHARD_SIZE


def base_bytes(shape: Shape) -> int:
    """Bytes of the bf16 base's weights (counted on the meta device: nothing allocated)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(shape))
    return sum(p.numel() for p in model.parameters()) * DTYPE.itemsize


def available_ram() -> int:
    """``MemAvailable`` from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024


def temporary_workdir(needed: int) -> Path:
    """A fresh temporary work dir: in /dev/shm (RAM) when it holds ``needed`` bytes with room to spare and the
    memory can afford it twice over, so that neither the setup nor the loads depend on the disk's speed (the
    checkpoints are read from the page cache either way); else under the default temporary directory."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > needed * 5 // 4 and available_ram() > 2 * needed
    return Path(tempfile.mkdtemp(prefix="uti-bench-gpu-", dir=shm if roomy else None))


@contextlib.contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a setup step into ``timings[name]`` and say on stderr how long it took."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"  {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)


def reusable(paths: Paths, params: GpuParams) -> bool:
    """The work dir holds every checkpoint of a finished setup of the same shape and seed (a given ``--workdir``,
    run again)."""
    if not (paths.root / PARAMS_NAME).is_file():
        return False
    old = GpuParams.from_dict(json.loads((paths.root / PARAMS_NAME).read_text()))
    ready = all(p.exists() for p in (paths.base, paths.adapter, paths.merged, paths.legacy_pt, paths.token_space))
    return ready and old.shape == params.shape and old.seed == params.seed


def prepare(paths: Paths, params: GpuParams) -> dict[str, float]:
    """Build and save, on the CPU: the token space, the base (safetensors shards), the adapter (RowExtensionConfig
    + get_peft_model + save_pretrained), the merged checkpoint (``uti_peft.merge_adapter``, streamed) and the
    legacy ``trainable_rows.pt`` (``uti_peft.export_legacy``). Returns the time of each step."""
    timings: dict[str, float] = {}
    if not reusable(paths, params):
        from peft import get_peft_model
        from transformers.utils import logging as hf_logging

        import uti_peft
        from uti_peft.tiny import build_token_space

        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")  # deprecations, and merge's "no tokenizer" (the base has none)
        shape = params.shape
        for path in (paths.base, paths.adapter, paths.merged, paths.legacy):
            shutil.rmtree(path, ignore_errors=True)
        paths.root.mkdir(parents=True, exist_ok=True)
        space = build_token_space(shape.text_vocab, special_size=shape.special, image_size=shape.image,
                                  n_codebooks=shape.codebooks, codebook_size=shape.codebook_size)
        assert space.vocab_size == shape.vocab_size, (space.vocab_size, shape.vocab_size)
        space.save(str(paths.token_space))
        with phase(timings, "build_base_s"):
            base = build_base(shape, params.seed)
        with phase(timings, "save_base_s"):
            base.save_pretrained(paths.base, max_shard_size=SHARD_SIZE)
        base.name_or_path = str(paths.base)  # what PEFT records as the adapter's base_model_name_or_path
        config = uti_peft.RowExtensionConfig(token_space=space, base_model_name_or_path=str(paths.base))
        with phase(timings, "get_peft_model_s"):  # includes the from-scratch row init (text-row statistics)
            model = get_peft_model(base, config)
        with phase(timings, "save_adapter_s"):
            model.save_pretrained(paths.adapter)
        del model, base
        gc.collect()
        with phase(timings, "merge_adapter_s"):
            uti_peft.merge_adapter(paths.base, paths.adapter, paths.merged, progress=False)
        with phase(timings, "export_legacy_s"):
            uti_peft.export_legacy(paths.adapter, paths.legacy, progress=False)
    (paths.root / PARAMS_NAME).write_text(json.dumps(params.to_dict(), indent=1))
    return timings
