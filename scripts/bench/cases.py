"""The child side: one function per measured case, run in a fresh process (``python scripts/bench.py --case NAME``)
so that no case inherits another's memory or warm state. Each returns a JSON-able dict: one line on stdout.

Cases: load (+ the first forwards) of ours / merged at each depth of the sweep and of the legacy loader, the
extended head's build (mapped, copied, plain copy), inference (prefill + greedy decode, ours vs merged),
training step (ours vs the legacy recipe), conversion (``convert_legacy`` vs torch.load + save_file), merge
(``uti_peft.merge_adapter`` vs the copy limit: a kernel copy of the base + the rows written; and, as information,
vs PEFT's ``merge_and_unload`` + ``save_pretrained``), extract (the merged checkpoint back to rows, beside merge),
and PEFT's own ways of training the new rows (``PEERS``: TrainableTokens, LoRA + ``modules_to_save``): their load
and training step beside ours. ``CASES`` names them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .params import DTYPE, PEERS, Params, Paths, Shape, tied_params
from .probes import (
    ScratchJob, dir_bytes, kill_after, probe_ids, proc_status, reset_peak_rss, steady_memory, tensor_sha256,
)


def import_model_stack() -> None:
    """Every load case imports the same modules, so that their RSS baselines are equal."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import uti_peft  # noqa: F401  (registers ROW_EXTENSION)


def load_base(path: Path):
    """The checkpoint at ``path`` in bf16, as every load case reads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE)


def load_ours(paths: Paths, params: Params, layers: Optional[int] = None, phases: Optional[dict] = None):
    """Base checkpoint + ``PeftModel.from_pretrained`` (resize + patch, by uti-peft), on the ``layers``-layer base
    (default: the main one). ``phases`` (when given) receives the seconds of each step (`time_load_phases`)."""
    from peft import PeftModel

    phases = {} if phases is None else phases
    start = time.perf_counter()
    base = load_base(paths.base_of(params, layers or params.shape.layers))
    phases["base_s"] = time.perf_counter() - start
    with time_load_phases(phases):
        model = PeftModel.from_pretrained(base, paths.adapter_of(params, layers or params.shape.layers))
    phases["from_pretrained_s"] = time.perf_counter() - start - phases["base_s"]
    return model


@contextlib.contextmanager
def time_load_phases(phases: dict) -> Iterator[None]:
    """Times the two steps of ``PeftModel.from_pretrained`` that move bytes, by wrapping the functions that do them
    for the duration (a measurement probe; the library is not changed): building the extended head
    (``extended_matrix``: a mapping of the base file, or a copy) and PEFT's load of the saved rows into the layers
    (``set_peft_model_state_dict``). The rest of ``from_pretrained`` (reading and checking the config and rows,
    injecting the layers, writing the new rows) is their difference from the total."""
    import peft.peft_model

    import uti_peft.row_extension.layer as layer

    originals = {(layer, "extended_matrix"): "head_build_s", (peft.peft_model, "set_peft_model_state_dict"):
                 "peft_load_rows_s"}

    def timed(function: Callable, key: str) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
        return call

    saved = {target: getattr(*target) for target in originals}
    for (module, name), key in originals.items():
        phases[key] = 0.0
        setattr(module, name, timed(saved[(module, name)], key))
    try:
        yield
    finally:
        for (module, name), function in saved.items():
            setattr(module, name, function)


def load_merged(paths: Paths, params: Params, layers: Optional[int] = None, phases: Optional[dict] = None):
    """The merged checkpoint of the ``layers``-layer base: what a plain resized model costs to load."""
    start = time.perf_counter()
    model = load_base(paths.merged_of(params, layers or params.shape.layers))
    if phases is not None:
        phases["base_s"] = time.perf_counter() - start
    return model


def load_peer(kind: str, paths: Paths, params: Params, phases: Optional[dict] = None):
    """One of PEFT's own ways (``PEERS``), loaded as its user must: the base, ``resize_token_embeddings(vocab_size)``
    (``mean_resizing=False``: the adapter overwrites every new row, and transformers' default mean-resizing takes
    minutes at these shapes, see load-legacy), then ``PeftModel.from_pretrained`` of the peer's adapter."""
    from peft import PeftModel

    phases = {} if phases is None else phases
    start = time.perf_counter()
    base = load_base(paths.base)
    phases["base_s"] = time.perf_counter() - start
    base.resize_token_embeddings(params.shape.vocab_size, mean_resizing=False)
    phases["resize_s"] = time.perf_counter() - start - phases["base_s"]
    model = PeftModel.from_pretrained(base, paths.peer(kind))
    phases["from_pretrained_s"] = time.perf_counter() - start - phases["base_s"] - phases["resize_s"]
    return model


def legacy_patch(model, paths: Paths, shape: Shape, mean_resizing: Optional[bool]):
    """The legacy loader (tests/conftest.py legacy_patch): resize to text_vocab_size, then to vocab_size,
    copy the rows of ``trainable_rows.pt`` in. ``mean_resizing=None`` leaves transformers' default (True)."""
    kwargs = {} if mean_resizing is None else {"mean_resizing": mean_resizing}
    model.resize_token_embeddings(shape.text_vocab, **kwargs)
    model.resize_token_embeddings(shape.vocab_size, **kwargs)
    ckpt = torch.load(paths.legacy_pt, map_location="cpu", weights_only=True)
    with torch.no_grad():
        model.get_input_embeddings().weight[shape.text_vocab :] = ckpt["embeddings"]
        if ckpt.get("lm_head") is not None:  # none for a tied base: its one matrix has the embedding's rows
            model.get_output_embeddings().weight[shape.text_vocab :] = ckpt["lm_head"]
    model.config.pad_token_id = json.loads(paths.token_space.read_text())["special_tokens"]["<|pad_mm|>"]
    return model


def load_legacy_default(paths: Paths, params: Params):
    """The legacy loader with transformers' defaults (mean-resizing: slow, run under a time limit)."""
    return legacy_patch(load_base(paths.base), paths, params.shape, mean_resizing=None)


def load_legacy_nomean(paths: Paths, params: Params):
    """The legacy loader with ``mean_resizing=False``: what the legacy path costs without the mean."""
    return legacy_patch(load_base(paths.base), paths, params.shape, mean_resizing=False)


def case_load(kind: str, paths: Paths, params: Params, layers: Optional[int] = None) -> dict[str, Any]:
    """Time load + the first forward of ``load_probe_tokens`` ids (text and new ids, ``use_cache=True``, last-token
    logits: as ``generate``'s prefill runs it), then ``warm_forwards - 1`` more of the same forward (how the first
    ones after a load compare), then read steady and peak RSS. Ours, merged and the peers (``PEERS``: base, resize, PEFT's load) also report the load's phases."""
    import_model_stack()
    before = proc_status()["VmRSS"]
    peak_reset = reset_peak_rss()
    ids = probe_ids(params.shape, params.load_probe_tokens, params.seed)
    if kind == "legacy":
        kill_after(params.legacy_timeout)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    if kind in ("ours", "merged"):
        model = (load_ours if kind == "ours" else load_merged)(paths, params, layers, phases)
    elif kind in PEERS:
        model = load_peer(kind, paths, params, phases)
    else:
        model = (load_legacy_default if kind == "legacy" else load_legacy_nomean)(paths, params)
    loaded = time.perf_counter()
    forwards = []
    with torch.no_grad():
        for _ in range(params.warm_forwards):
            begin = time.perf_counter()
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
            forwards.append(time.perf_counter() - begin)
            if len(forwards) == 1:
                first_logits = logits
            if kind == "legacy":
                break  # its time limit covers the load only
    kill_after(0)
    return {
        "load_s": loaded - start,
        "forward_s": forwards[0],
        "forwards_s": forwards,
        "seconds": loaded - start + forwards[0],
        "phases": phases,
        "rss_after_imports_bytes": before,
        "peak_reset": peak_reset,
        "logits_width": first_logits.shape[-1],
        "logits_sha256": tensor_sha256(first_logits[0, -1]),
        **steady_memory(),
    }


def case_cache(layers: int, paths: Paths, params: Params) -> dict[str, Any]:
    """Read the checkpoints one depth's load cases read (its base and merged checkpoint, the adapter) once, so that
    they are in the page cache, as after a download or an earlier run: the work dir of a sweep is larger than many
    machines' memory, and a file that was evicted would be timed as a disk read."""
    return read_into_page_cache(paths.base_of(params, layers), paths.merged_of(params, layers),
                                paths.adapter_of(params, layers))


def case_cache_tied(paths: Paths, params: Params) -> dict[str, Any]:
    """`case_cache` for the tied variant's cases: its base, merged checkpoint, adapter and peers."""
    tied = paths.tied
    return read_into_page_cache(tied.base, tied.merged, tied.adapter, *(tied.peer(kind) for kind in PEERS))


def read_into_page_cache(*directories: Path) -> dict[str, Any]:
    """Read every safetensors file in ``directories`` once; returns the bytes read."""
    read = 0
    for directory in directories:
        for path in sorted(directory.glob("*.safetensors")):
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    read += len(chunk)
    return {"bytes_read": read}


def case_head_build(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """Build the extended lm_head matrix (vocab_size rows, the base's text rows first) from the memory-mapped base's
    head, as loading does, and read its text rows once (what the first forward does): ``map`` is uti-peft's way
    (`uti_peft.memory.extended_matrix`: a second mapping of the file, nothing copied), ``copy`` its fallback where the
    base is not a clean file mapping (fresh rows + `copy_releasing_source`), ``plain`` a plain ``torch.empty`` +
    ``copy_`` of the same bytes, then the same copy again between the now resident buffers: memory speed."""
    import_model_stack()
    from uti_peft.memory import copy_releasing_source, extended_matrix

    shape = params.shape
    weight = load_base(paths.base).get_output_embeddings().weight.detach()
    text, nbytes = weight[: shape.text_vocab], shape.text_vocab * shape.hidden * weight.element_size()
    start = time.perf_counter()
    if kind == "map":
        extended = extended_matrix(weight, shape.text_vocab, shape.vocab_size)
    else:
        extended = torch.empty(shape.vocab_size, shape.hidden, dtype=weight.dtype)
        (copy_releasing_source if kind == "copy" else torch.Tensor.copy_)(extended[: shape.text_vocab], text)
    built = time.perf_counter()
    checksum = float(extended[: shape.text_vocab].sum(dtype=torch.float32))  # touches every text row once
    read = time.perf_counter()
    result = {"build_s": built - start, "read_s": read - built, "text_bytes": nbytes, "checksum": checksum,
              "build_gb_per_s": nbytes / 1e9 / (built - start)}
    if kind == "plain":
        again = time.perf_counter()
        extended[: shape.text_vocab].copy_(text)
        result["resident_copy_gb_per_s"] = nbytes / 1e9 / (time.perf_counter() - again)
    return result


def greedy(model, ids: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
    """Prefill ``ids`` (last-token logits only, as ``generate`` does), then ``steps`` greedy decode steps with
    the KV cache. Returns (prefill seconds, decode seconds, generated ids). Each clock is read after the token is
    read back (``int``), which waits for a GPU's queued kernels."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        prefilled = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        done = time.perf_counter()
    return prefilled - start, done - prefilled, tokens


def case_inference(paths: Paths, params: Params) -> dict[str, Any]:
    """Adapter model vs. merged model in one process, run alternately (ABBA order) after a warm-up."""
    import_model_stack()
    models = {"ours": load_ours(paths, params), "merged": load_merged(paths, params)}
    ids = probe_ids(params.shape, params.prefill_tokens, params.seed + 1)
    for model in models.values():  # warm-up: kernels, allocator
        greedy(model, ids[:, :8], 1)
    raw: dict[str, dict[str, list]] = {name: {"prefill_s": [], "decode_s": []} for name in models}
    tokens: dict[str, list[int]] = {}
    for rep in range(params.reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            prefill_s, decode_s, tokens[name] = greedy(models[name], ids, params.decode_steps)
            raw[name]["prefill_s"].append(prefill_s)
            raw[name]["decode_s"].append(decode_s)
    return {"raw": raw, "tokens": tokens, "same_tokens": tokens["ours"] == tokens["merged"], **steady_memory()}


def legacy_training_model(paths: Paths, params: Params, load: Callable = load_merged):
    """The legacy recipe: the resized model, whole embedding and lm_head trainable, the rest frozen, and a hook
    zeroing the text rows' gradient (into a fresh tensor: tensor hooks must not modify their input).

    The resized model is the merged checkpoint (``load(paths, params)``, by default onto the CPU): its weights equal
    the legacy-patched model's bit for bit (the load cases check the logits) and it loads in ~1 s instead of the
    ~40 s of two resizes."""
    model = load(paths, params)
    model.requires_grad_(False)
    text_vocab = params.shape.text_vocab

    def zero_text_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:text_vocab] = 0
        return grad

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.weight.requires_grad_(True)
        module.weight.register_hook(zero_text_rows)
    return model


def ours_training_model(paths: Paths, params: Params):
    """The adapter loaded trainable: only the new rows are parameters (the same layers ``get_peft_model`` builds;
    its from-scratch row initialisation is timed in the setup instead, see setup_s.get_peft_model_s)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(paths.base), paths.adapter, is_trainable=True)


def peer_training_model(kind: str, paths: Paths, params: Params):
    """One of PEFT's own ways (``PEERS``) loaded trainable on the resized model: as in `legacy_training_model`, the
    merged checkpoint stands for the resized base (the peer's adapter overwrites the new rows either way)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_merged(paths, params), paths.peer(kind), is_trainable=True)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of gradients (params holding .grad) and of every tensor in the optimizer state."""
    unique = {id(p): p for p in model.parameters()}.values()
    grads = sum(p.grad.nbytes for p in unique if p.grad is not None)
    moments = scalars = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                if value.dim() == 0:
                    scalars += value.nbytes
                else:
                    moments += value.nbytes
    return {
        "grad_bytes": grads,
        "optimizer_tensor_bytes": moments,
        "optimizer_scalar_bytes": scalars,
        "state_bytes": grads + moments + scalars,
    }


def prime(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """Warm-up that does not pay for a backward pass (~20 s per token at full shape on an AVX2 CPU, see
    --train-steps): a forward, and an optimizer step on zero gradients, which allocates the AdamW state and faults
    the weights in (copy-on-write pages of the memory-mapped checkpoint); the weights barely move."""
    with torch.no_grad():
        model(input_ids=batch)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def case_train(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """A warm-up (`prime`, or a full step with --full-warmup), then ``train_steps`` timed AdamW steps on a batch
    of 1 x ``train_seq_len`` ids; the gradient and optimizer-state bytes are read at the last step, before
    ``zero_grad``."""
    import_model_stack()
    if kind in PEERS:
        model = peer_training_model(kind, paths, params)
    else:
        model = (ours_training_model if kind == "ours" else legacy_training_model)(paths, params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = probe_ids(params.shape, params.train_seq_len, params.seed + 2)
    model.train()
    if params.full_warmup:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        prime(model, optimizer, batch)
    phases: dict[str, list[float]] = {"step_s": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
    measured: dict[str, int] = {}
    for step in range(params.train_steps):
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step == params.train_steps - 1:
            measured = state_bytes(model, optimizer)  # the same at every step
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, value in (("step_s", t4 - t0), ("forward_s", t1 - t0), ("backward_s", t2 - t1),
                           ("optimizer_s", t3 - t2)):
            phases[key].append(value)
    return {
        **phases,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_shapes": [list(p.shape) for p in trainable],
        "loss": float(loss),
        **measured,
        **steady_memory(),
    }


def case_convert(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """``convert_legacy`` vs. the plain work it has to do: torch.load the .pt and save_file the rows."""
    from safetensors.torch import save_file

    if kind == "ours":
        import uti_peft

        convert_legacy = uti_peft.convert_legacy  # imports its modules (peft, transformers) before the clock
    out = paths.scratch(f"convert-{kind}-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if kind == "ours":
        convert_legacy(paths.legacy, out, progress=False)
    else:
        out.mkdir(parents=True)
        ckpt = torch.load(paths.legacy_pt, map_location="cpu", weights_only=True)
        rows = {"input_embeddings.new_rows": ckpt["embeddings"], "output_embeddings.new_rows": ckpt["lm_head"]}
        save_file(rows, str(out / "adapter_model.safetensors"))
    seconds = time.perf_counter() - start
    written = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "written_bytes": written, **steady_memory()}


def merged_tensors_sha256(out: Path) -> str:
    """One digest over every tensor written (name, dtype, shape, bytes; in name order, across shards)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    files = sorted(out.glob("*.safetensors"))
    names = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update({name: path for name in f.keys()})
    for name in sorted(names):
        with safe_open(str(names[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def case_merge(kind: str, layers: int, paths: Paths, params: Params) -> dict[str, Any]:
    """Merge the adapter into the ``layers``-layer base and write the checkpoint: ``uti_peft.merge_adapter``
    (streamed) or PEFT's way (load, ``merge_and_unload()``, ``save_pretrained``). Time and peak RSS cover the
    whole job; the digest of what was written is taken afterwards."""
    import_model_stack()
    from uti_peft import merge_adapter  # its modules imported before the clock

    base, adapter = paths.base_of(params, layers), paths.adapter_of(params, layers)
    job = ScratchJob(paths.scratch(f"merge-{kind}-{layers}L-{os.getpid()}"))
    if kind == "ours":
        merge_adapter(base, adapter, job.out, progress=False)
    else:
        from peft import PeftModel

        PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload().save_pretrained(job.out)
    result = {**job.stop(), "written_bytes": dir_bytes(job.out), "tensors_sha256": merged_tensors_sha256(job.out)}
    job.remove()
    return result


def case_merge_floor(layers: int, paths: Paths, params: Params) -> dict[str, Any]:
    """The copy limit of a merge (issue #26): what writing the merged checkpoint costs at the least, on this machine.
    Every file of the ``layers``-layer base is copied to a scratch dir by the kernel (``shutil.copyfile``: sendfile /
    copy_file_range on Linux, the bytes never enter the process), then the adapter's new rows are read and written
    once more (``save_file`` of the two row blocks), the part of the merged checkpoint that is not the base's.
    About the merged checkpoint's bytes (the base's few padding rows beyond the text vocabulary are copied too, a
    merge drops them). Time and peak RSS as in ``case_merge``; the scratch output is removed afterwards."""
    import_model_stack()  # the same RSS baseline as case_merge
    from safetensors.torch import load_file, save_file

    base = paths.base_of(params, layers)
    job = ScratchJob(paths.scratch(f"merge-floor-{layers}L-{os.getpid()}"))
    job.out.mkdir(parents=True)
    for path in sorted(base.iterdir()):
        if path.is_file():
            shutil.copyfile(path, job.out / path.name)
    save_file(load_file(str(paths.adapter / "adapter_model.safetensors")), str(job.out / "rows.safetensors"))
    result = {**job.stop(), "written_bytes": dir_bytes(job.out)}
    job.remove()
    return result


def case_extract(layers: int, paths: Paths, params: Params) -> dict[str, Any]:
    """``uti_peft.extract_adapter``: the ``layers``-layer merged checkpoint turned back into rows (every tensor
    compared with the base's, the text rows checked, the new rows written). Time and peak RSS cover the whole job;
    ``rows_identical``: the rows file written is the adapter's, byte for byte (the round trip)."""
    import_model_stack()
    from uti_peft.extract import extract_adapter
    from uti_peft import merge_adapter

    base, source = paths.base_of(params, layers), paths.merged_of(params, layers)
    adapter = paths.adapter_of(params, layers)
    if not (source / "config.json").is_file():  # a merge-only depth: its merged checkpoint, made once, untimed
        merge_adapter(base, adapter, source, progress=False)
    job = ScratchJob(paths.scratch(f"extract-{layers}L-{os.getpid()}"))
    # the bench's merged checkpoints carry no token space nor tokenizer: the adapter's token space says the rows
    extract_adapter(base, source, job.out, token_space=adapter / "token_space.json", progress=False)
    result = job.stop()
    rows_file = "adapter_model.safetensors"
    identical = (job.out / rows_file).read_bytes() == (adapter / rows_file).read_bytes()
    result.update({"read_bytes": dir_bytes(source) + dir_bytes(base), "written_bytes": dir_bytes(job.out),
                   "rows_identical": identical})
    job.remove()
    return result


def case_switch(paths: Paths, params: Params) -> dict[str, Any]:
    """Switching between two row adapters of one token space (``set_adapter``, there and back) against a plain copy
    of the adapter's rows (both blocks, resident to resident): the switch swaps the head's tail in place, the
    untied embedding's rows need nothing."""
    import_model_stack()
    model = load_ours(paths, params)
    model.load_adapter(paths.adapter, adapter_name="second")
    rows = [p.detach() for n, p in model.named_parameters() if ".default" in n and "row_extension" in n]
    copies = [torch.empty_like(r) for r in rows]
    switches, plain = [], []
    for _ in range(5):
        start = time.perf_counter()
        model.set_adapter("second")
        model.set_adapter("default")
        switches.append((time.perf_counter() - start) / 2)
        start = time.perf_counter()
        for src, dst in zip(rows, copies):
            dst.copy_(src)
        plain.append(time.perf_counter() - start)
    return {"switch_s": sorted(switches)[2], "copy_s": sorted(plain)[2],
            "rows_bytes": sum(r.numel() * r.element_size() for r in rows)}


def case_head_loss(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """One training step's lm_head + loss on a long sequence (2,048 tokens; 64 with --quick), from hidden states:
    ``fused`` is TRL's chunked log-prob kernel reading the head's ``.weight`` (never the 164,021-wide logits, but a
    transient ``[vocab, hidden]`` float32 weight gradient), ``unfused`` our lm_head module + cross-entropy (the full
    logits, gradients to the rows only). Time of forward + backward and the peak RSS above the set-up."""
    import torch.nn.functional as F
    from trl.kernels import ChunkedLogProbFunction

    from uti_peft.row_extension.layer import RowExtensionLinear

    shape, tokens = params.shape, 64 if params.quick else 2048
    generator = torch.Generator().manual_seed(params.seed)
    base = torch.nn.Linear(shape.hidden, shape.vocab_rows, bias=False, dtype=DTYPE)
    head = RowExtensionLinear(base, "default")
    head.update_layer("default", shape.text_vocab, torch.randn(shape.new_rows, shape.hidden, generator=generator).to(DTYPE))
    base.weight.requires_grad_(False)
    hidden = torch.randn(tokens, shape.hidden, generator=generator).to(DTYPE).requires_grad_()
    labels = torch.randint(0, shape.vocab_size, (tokens,), generator=generator)
    peak_reset, before = reset_peak_rss(), proc_status()["VmRSS"]
    start = time.perf_counter()
    if kind == "fused":
        log_probs = ChunkedLogProbFunction.apply(hidden, head.weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))[0]
        loss = -log_probs.mean()
    else:
        loss = F.cross_entropy(head(hidden).float(), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    rows = head.trained_rows["default"]
    return {"seconds": seconds, "tokens": tokens, "peak_rss_above_setup_bytes": proc_status()["VmHWM"] - before,
            "peak_reset": peak_reset, "loss": float(loss.detach()), "rows_grad_norm": float(rows.grad.float().norm())}


LAYER_CHOICES = range(1, 37)  # --layers and --merge-layers values that have a case (Qwen3-8B has 36 layers)

def on_tied(case: Callable[[Paths, Params], dict[str, Any]]) -> Callable[[Paths, Params], dict[str, Any]]:
    """``case`` run on the tied variant's checkpoints and parameters (``Paths.tied``, ``tied_params``)."""
    return lambda paths, params: case(paths.tied, tied_params(params))


CASES: dict[str, Callable[[Paths, Params], dict[str, Any]]] = {
    **{f"load-{kind}-{n}L": (lambda p, q, kind=kind, n=n: case_load(kind, p, q, n))
       for kind in ("ours", "merged") for n in LAYER_CHOICES},
    **{f"cache-{n}L": (lambda p, q, n=n: case_cache(n, p, q)) for n in LAYER_CHOICES},
    **{f"head-{kind}": (lambda p, q, kind=kind: case_head_build(kind, p, q)) for kind in ("map", "copy", "plain")},
    "load-legacy": lambda p, q: case_load("legacy", p, q),
    "load-legacy-nomean": lambda p, q: case_load("legacy_nomean", p, q),
    "inference": case_inference,
    "switch": case_switch,
    **{f"head-loss-{kind}": (lambda p, q, kind=kind: case_head_loss(kind, p, q)) for kind in ("fused", "unfused")},
    "train-ours": lambda p, q: case_train("ours", p, q),
    "train-legacy": lambda p, q: case_train("legacy", p, q),
    **{f"load-peer-{kind}": (lambda p, q, kind=kind: case_load(kind, p, q)) for kind in PEERS},
    **{f"train-peer-{kind}": (lambda p, q, kind=kind: case_train(kind, p, q)) for kind in PEERS},
    # the peers' comparison again on a tied base of the same widths (``Paths.tied``)
    "cache-tied": case_cache_tied,
    "load-ours-tied": on_tied(lambda p, q: case_load("ours", p, q)),
    "load-legacy-nomean-tied": on_tied(lambda p, q: case_load("legacy_nomean", p, q)),
    **{f"load-peer-{kind}-tied": on_tied(lambda p, q, kind=kind: case_load(kind, p, q)) for kind in PEERS},
    "train-ours-tied": on_tied(lambda p, q: case_train("ours", p, q)),
    **{f"train-peer-{kind}-tied": on_tied(lambda p, q, kind=kind: case_train(kind, p, q)) for kind in PEERS},
    "convert-ours": lambda p, q: case_convert("ours", p, q),
    "convert-plain": lambda p, q: case_convert("plain", p, q),
    **{f"merge-{kind}-{n}L": (lambda p, q, kind=kind, n=n: case_merge(kind, n, p, q))
       for kind in ("ours", "peft") for n in LAYER_CHOICES},
    **{f"merge-floor-{n}L": (lambda p, q, n=n: case_merge_floor(n, p, q)) for n in LAYER_CHOICES},
    **{f"extract-{n}L": (lambda p, q, n=n: case_extract(n, p, q)) for n in LAYER_CHOICES},
}


def run_cases_here(names: list[str], workdir: Path) -> None:
    """Child-process entry point: run the cases in order, one JSON line each on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    paths = Paths(workdir)
    params = Params.from_dict(json.loads(paths.params.read_text()))
    torch.manual_seed(params.seed)
    for name in names:
        result = {"case": name, "pid": os.getpid(), **CASES[name](paths, params)}
        print(json.dumps(result), flush=True)
