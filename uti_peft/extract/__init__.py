"""``uti-peft extract``: a vocabulary extension in a heavy form turned back into rows (the inverse of ``merge``).

Three sources are accepted, each against the ``BASE`` it extends:

* a **resized checkpoint** (safetensors, one file or shards): the legacy recipe's merged model, a fully fine-tuned
  one, a community release. Its embedding (and untied lm_head) rows ``[text_vocab_size, vocab_size)`` become the
  rows; its text rows must equal the base's and every other tensor must be the base's byte for byte;
* a **PEFT LoRA adapter** that saved the whole embedding / lm_head (``modules_to_save`` or
  ``save_embedding_layers``): the matrices' new rows become the rows and the LoRA weights are kept as the companion
  LoRA (``lora/``, as `uti_peft.add_lora` saves it);
* a **PEFT trainable-tokens adapter** (``TrainableTokensConfig`` or ``LoraConfig(trainable_token_indices=...)``):
  its ``trainable_tokens_delta`` rows at ``token_indices`` become the rows.

Like `uti_peft.merge`, nothing is instantiated: checkpoints are read tensor by tensor (safetensors headers, then
16 MiB slices), the module names come from the base built on the ``meta`` device, and peak memory is that of the
largest tensor compared (two, when one differs) plus the new rows. Everything is checked before the first byte is
written, and the adapter directory appears atomically. The result loads through every door with logits equal to
the source model's; ``extract(merge(base, adapter))`` gives back the adapter's rows byte for byte.
"""

from .describe import describe_source
from .plan import plan_extract
from .sources import CHECKPOINT, CHECKPOINT_FILES, EXTRACTABLE, LORA, TRAINABLE_TOKENS, ExtractPlan, source_kind
from .vocabulary import infer_token_space, resolve_source_token_space
from .write import extract_adapter

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FILES",
    "EXTRACTABLE",
    "LORA",
    "TRAINABLE_TOKENS",
    "ExtractPlan",
    "describe_source",
    "extract_adapter",
    "infer_token_space",
    "plan_extract",
    "resolve_source_token_space",
    "source_kind",
]
