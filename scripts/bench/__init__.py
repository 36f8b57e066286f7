"""Side-by-side benchmark of uti-peft's row-extension adapter at Qwen3-8B embedding shapes (issue #5).

What it measures, and against what:

1. **Load** (load + one short forward, so the weights are touched): ours (base + ``PeftModel.from_pretrained``)
   vs. a merged checkpoint vs. the legacy loader (resize, resize, copy rows; transformers defaults, which means
   mean-resizing: run once, under a timeout, reported as a lower bound; and with ``mean_resizing=False``).
2. **Memory** of each load case: steady RSS (after ``gc``) and peak RSS, read from ``/proc/self/status``.
3. **Inference**: prefill of N tokens, then D greedy decode steps with the KV cache, adapter vs. merged model,
   both loaded in one process and run alternately.
4. **Training step** (batch 1 x seq, AdamW): ours (new rows only are parameters) vs. the legacy recipe (whole
   embedding and lm_head trainable, a hook zeroing the text rows' gradients): step time and the bytes of
   gradients + optimizer state.
5. **Size and conversion**: adapter directory bytes vs. the rows' bytes vs. PEFT's ``modules_to_save``
   alternative, and ``convert_legacy`` vs. a plain ``torch.load`` + ``safetensors`` ``save_file``.
6. **Merge** (issues #12, #26): ``uti_peft.merge_adapter`` (``uti-peft merge``, streamed) vs. the copy floor (a
   kernel copy of every file of the base + the adapter's rows written: the least writing the merged checkpoint
   costs) and, as information, vs. ``PeftModel.from_pretrained`` + ``merge_and_unload()`` + ``save_pretrained``:
   wall time, peak RSS and the written tensors (identical to PEFT's), for bases of each ``--merge-layers``
   decoder-layer count.
7. **Peers** (issue #26): PEFT's own ways of training the new rows, saved once from the resized model: TrainableTokens
   on the 12,352 new ids (embedding and untied lm_head) and LoRA with ``modules_to_save=["embed_tokens", "lm_head"]``:
   load (base + ``resize_token_embeddings`` + ``PeftModel.from_pretrained``) + first forward, steady and peak RSS,
   logits against the legacy recipe's, one training step and its state bytes, adapter bytes; ours vs the best peer;
   then again on a tied base of the same widths (``Paths.tied``: TrainableTokens on the embedding, which PEFT
   ties to the head, and LoRA with ``ensure_weight_tying``).

Why this shape: the base is built locally (no download) as a Qwen3 with the 8B's embedding shapes (151,936 rows,
hidden 4,096, bf16, untied) and the 8B's decoder-layer shapes, but only ``--layers`` (default 1) decoder layers:
the embedding and the lm_head are what the adapter changes, the layers are the same in every case compared.
The token space is ``uti_peft.tiny.build_token_space()`` with the real sizes (151,669 text + 12,352 new rows).

Every case runs in a fresh process (``python scripts/bench.py --case NAME``, which prints one JSON line per case):
each load and conversion repetition, the inference comparison, each training recipe. Page cache aside, no case
inherits another's memory or warm state.
Results go to ``--out`` as ``bench.json`` (machine, parameters, raw repetitions, medians, ratios, targets) and
``bench.md`` (one table). ``--quick`` runs the same code on a tiny shape in well under a minute (for tests).

Defaults are sized to finish in under 10 minutes on a 2-core AVX2 machine without native bf16 matmul (~8 minutes
measured, ~6 GB of checkpoints in the work dir, ~16 GB peak RSS in the legacy training case); the issue's full
sizes, for a bigger machine: ``--prefill-tokens 512 --decode-steps 32 --train-seq-len 512 --train-steps 3
--full-warmup``. What differs from the issue's wording, and why, is listed under ``notes`` in the outputs.

Layout (``scripts/bench/``, a package beside the ``scripts/bench.py`` entry point, which puts ``scripts/`` on
``sys.path`` and calls ``bench.cli.main``): ``params`` (shapes, parameters, work-dir paths), ``workdir`` (builds the
checkpoints every case reads), ``probes`` (RSS, digests, ids: what a case measures with), ``cases`` (the child side:
one function per measured case), ``runner`` (the parent side: fresh processes, schedule, repetitions), ``report``
(bench.json sections, targets, bench.md), ``cli`` (the command line) and ``gpu/`` (the GPU benchmark,
``scripts/bench_gpu.py``: full-depth loads, inference and training on one device, its own runner and report).
"""
