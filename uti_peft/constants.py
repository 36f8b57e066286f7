"""Names shared by every layer: the files of a saved adapter and the names of its tensors."""

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
TOKEN_SPACE_NAME = "token_space.json"
CARD_NAME = "README.md"
# Architecture-independent names of the two row blocks in WEIGHTS_NAME (see `uti_peft.row_extension.model`).
INPUT_ROWS_KEY = "input_embeddings.new_rows"
OUTPUT_ROWS_KEY = "output_embeddings.new_rows"
PEFT_KEY_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes every saved key
PEFT_TYPE_NAME = "ROW_EXTENSION"
# Marks uti_peft_autoload's stand-in for transformers' load_adapter (it holds the original under this name).
AUTOLOAD_ORIGINAL_ATTRIBUTE = "__uti_peft_autoload_original__"
