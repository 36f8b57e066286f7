"""Names and defaults shared by every layer and the command line: the files of a saved adapter, the names of its
tensors, and the choices and defaults the options offer. Nothing is imported (no torch, transformers or peft),
so ``uti-peft --help`` shows these values without loading a deep-learning stack."""

# files
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
TOKEN_SPACE_NAME = "token_space.json"
CARD_NAME = "README.md"
LEGACY_PT_NAME = "trainable_rows.pt"
LEGACY_JSON_NAME = "trainable_rows.json"
EXPORT_MARKER_NAME = ".uti-peft-export.json"  # written by export_legacy: the only directory --overwrite replaces
# Architecture-independent names of the two row blocks in WEIGHTS_NAME (see `uti_peft.row_extension.model`).
INPUT_ROWS_KEY = "input_embeddings.new_rows"
OUTPUT_ROWS_KEY = "output_embeddings.new_rows"
PEFT_KEY_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes every saved key
PEFT_TYPE_NAME = "ROW_EXTENSION"
# Marks uti_peft_autoload's stand-in for transformers' load_adapter (it holds the original under this name).
AUTOLOAD_ORIGINAL_ATTRIBUTE = "__uti_peft_autoload_original__"

# the adapter
INIT_STRATEGIES = ("mean_noise", "mean")
HEAD_ROW_MODES = ("trained", "mean")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# data
DEFAULT_MAX_SEQ_LEN = 2048
TRUNCATION_SIDES = ("left", "right")

# the Hub
DEFAULT_COMMIT_MESSAGE = "Upload row-extension adapter"
