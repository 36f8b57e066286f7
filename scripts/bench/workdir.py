"""The checkpoints every case reads, built once in the work dir by the parent before any case runs: a Qwen3 base of
the benchmark's shape (no download, no slow init), the adapter, the merged and the legacy checkpoints, and a base
(with the adapter as saved from it, and for the load sweep a merged checkpoint) per other decoder-layer count. A
``--workdir`` prepared earlier for the same shape and seed is reused."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import time
from dataclasses import replace
from typing import Iterator

import torch

from .params import DTYPE, PEERS, Params, Paths, Shape, tied_params


def qwen3_config(shape: Shape):
    """A Qwen3 config of ``shape``, with Qwen3-8B's other settings (rope, norm eps; untied unless ``shape.tied``)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab_rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tied,
    )


def fill_pseudo_random(tensor: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> None:
    """Fill with slices of a random pool at random offsets: N(0, 0.02²)-like values at memcpy speed (a plain
    ``normal_`` over the 1.3 G parameters takes ~30 s here, and the values do not matter for timing)."""
    flat = tensor.view(-1)
    chunk = pool.numel() // 2
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        offset = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=generator))
        flat[start : start + n].copy_(pool[offset : offset + n])


def build_base(shape: Shape, seed: int):
    """A bf16 Qwen3ForCausalLM of ``shape``, built without a download and without the slow init."""
    from transformers import Qwen3ForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the init
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = Qwen3ForCausalLM._from_config(qwen3_config(shape), dtype=DTYPE)
    model.tie_weights()  # a tied shape: one matrix (_from_config under no_init_weights leaves two)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=generator) * 0.02).to(DTYPE)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                fill_pseudo_random(param.data, pool, generator)
            else:
                param.data.fill_(1.0)  # RMSNorm weights
    model.config.dtype = DTYPE
    return model.eval()


def prepare_workdir(paths: Paths, params: Params) -> dict[str, float]:
    """Build and save the base, the adapter, the merged checkpoint and the legacy checkpoint; returns timings.

    Reuses a work dir prepared earlier for the same shape (``--workdir`` given twice)."""
    if paths.params.is_file():
        old = Params.from_dict(json.loads(paths.params.read_text()))
        ready = all(p.exists() for p in (paths.base, paths.adapter, paths.merged, paths.legacy_pt))
        if old.shape == params.shape and old.seed == params.seed and ready:
            paths.params.write_text(json.dumps(params.to_dict(), indent=1))
            return {"reused": 1.0}
    from peft import get_peft_model

    import uti_peft
    from uti_peft.tiny import build_token_space

    # built for another shape or seed
    other_depths = [path for kind in ("base", "adapter", "merged") for path in paths.root.glob(f"{kind}-*L")]
    peers = [paths.peer(kind) for kind in PEERS]  # made on the old base
    for p in (paths.base, paths.adapter, paths.merged, paths.legacy, paths.root / "scratch", *other_depths, *peers):
        shutil.rmtree(p, ignore_errors=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    shape, timings = params.shape, {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    space = build_token_space(
        shape.text_vocab, special_size=shape.special, image_size=shape.image,
        n_codebooks=shape.codebooks, codebook_size=shape.codebook_size,
    )
    assert space.vocab_size == shape.vocab_size, (space.vocab_size, shape.vocab_size)
    space.save(str(paths.token_space))
    with timed("build_base_s"):
        base = build_base(shape, params.seed)
    with timed("save_base_s"):
        base.save_pretrained(paths.base)
    # trained as users train: on the base loaded from its checkpoint, whose head maps the file, so that the adapter's
    # rows file is laid out to be mapped back at load (uti_peft.memory.page_aligned_metadata)
    del base
    gc.collect()
    from transformers import AutoModelForCausalLM

    with timed("load_base_s"):
        base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=DTYPE)
    config = uti_peft.RowExtensionConfig(token_space=space, base_model_name_or_path=str(paths.base))
    with timed("get_peft_model_s"):  # includes the from-scratch row init (text-row statistics)
        model = get_peft_model(base, config)
    with timed("save_adapter_s"):
        model.save_pretrained(paths.adapter)
    with timed("merge_s"):
        merged = model.merge_and_unload()
    with timed("save_merged_s"):
        merged.save_pretrained(paths.merged)
    del model, merged, base
    gc.collect()
    with timed("export_legacy_s"):
        uti_peft.export_legacy(paths.adapter, paths.legacy, progress=False)
    paths.params.write_text(json.dumps(params.to_dict(), indent=1))
    return timings


def prepare_depths(paths: Paths, params: Params) -> dict[str, float]:
    """Save a base of each decoder-layer count of the load sweep (``depths``) and of the merge case
    (``merge_layers``) that the main base is not, the adapter as saved from it (`Paths.adapter_of`), and a merged
    checkpoint of each sweep depth (``uti-peft merge``, bit-identical to PEFT's ``merge_and_unload``: the merge case
    checks it); those already there are kept."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import uti_peft

    timings = {}
    for layers in sorted(set(params.depths) | set(params.merge_layers)):
        path, adapter = paths.base_of(params, layers), paths.adapter_of(params, layers)
        if not (path / "config.json").is_file():
            start = time.perf_counter()
            base = build_base(replace(params.shape, layers=layers), params.seed)
            base.save_pretrained(path)
            del base
            gc.collect()
            timings[f"build_save_base_{layers}L_s"] = time.perf_counter() - start
        if not (adapter / "adapter_config.json").is_file():
            start = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE)
            PeftModel.from_pretrained(base, paths.adapter).save_pretrained(adapter)
            del base
            gc.collect()
            timings[f"save_adapter_{layers}L_s"] = time.perf_counter() - start
    for layers in params.depths:
        path = paths.merged_of(params, layers)
        if (path / "config.json").is_file():
            continue
        start = time.perf_counter()
        uti_peft.merge_adapter(paths.base_of(params, layers), paths.adapter_of(params, layers), path, progress=False)
        timings[f"merge_{layers}L_s"] = time.perf_counter() - start
    return timings


def peer_config(kind: str, shape: Shape):
    """The PEFT config of one of PEFT's own ways (``PEERS``) of training the new rows of a base resized to
    ``vocab_size``: ``TrainableTokens`` on the new ids (the base's padding rows past the text vocabulary included,
    as a single ``resize_token_embeddings(vocab_size)`` leaves them), in the embedding and, on an untied base, in
    the lm_head too (targeting the embedding only would train the input rows alone and leave the head's new rows at
    the resize's values; on a tied base PEFT ties the head's layer to the embedding's itself); or LoRA (r 8, on
    q_proj) with the whole embedding and lm_head in ``modules_to_save`` (on a tied base with
    ``ensure_weight_tying``, PEFT's way of keeping the two one matrix)."""
    from peft import LoraConfig, TrainableTokensConfig

    if kind == "trainable-tokens":
        return TrainableTokensConfig(target_modules=["embed_tokens"] if shape.tied else ["embed_tokens", "lm_head"],
                                     token_indices=list(range(shape.text_vocab, shape.vocab_size)))
    if kind == "lora-modules-to-save":
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
                          ensure_weight_tying=shape.tied)
    raise ValueError(f"unknown peer {kind!r}")


def prepare_peers(paths: Paths, params: Params) -> dict[str, float]:
    """Save each peer adapter (``peer_config``) made on the resized base whose new rows are the adapter's: the
    merged checkpoint (bit-identical to resize + copy the rows, see the load cases' logits), so that a peer's
    saved rows are ours and its logits after load can be compared with the legacy recipe's. LoRA's B starts at
    zero: it changes nothing. Saved without the resized matrices (``save_embedding_layers=False``: the user resizes
    the base before loading anyway), PEFT's smallest adapter for each way. Those already there are kept."""
    from peft import get_peft_model

    timings = {}
    for kind in PEERS:
        out = paths.peer(kind)
        if (out / "adapter_config.json").is_file():
            continue
        start = time.perf_counter()
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=DTYPE)
        model.name_or_path = str(paths.base)  # what PEFT records as the adapter's base_model_name_or_path
        # PEFT's default (save_embedding_layers='auto') would also save the whole resized embedding and lm_head,
        # the vocabulary having grown (3.09 GB / 8.06 GB at Qwen3-8B's shapes): the peers' best case is without
        get_peft_model(model, peer_config(kind, params.shape)).save_pretrained(out, save_embedding_layers=False)
        del model
        gc.collect()
        timings[f"peer_{kind}_s"] = time.perf_counter() - start
    return timings


def prepare_tied(paths: Paths, params: Params) -> dict[str, float]:
    """The tied variant's checkpoints and peers (``Paths.tied``), built as the main ones; returns timings."""
    tied_paths, params = paths.tied, tied_params(params)
    timings = prepare_workdir(tied_paths, params)
    timings.update(prepare_peers(tied_paths, params))
    return {f"tied_{name}": seconds for name, seconds in timings.items()}
