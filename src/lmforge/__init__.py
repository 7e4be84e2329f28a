"""lmforge: Transformer language models from the equations up, on PyTorch.

Public API (everything a user needs is importable from here):

    import lmforge
    model = lmforge.GPT.from_preset("tiny")          # or lmforge.load_model("gpt2" / a directory)
    out = model(input_ids, targets)                  # out.logits (B, T, vocab), out.loss
    model.save_pretrained("my-model")                # transformers.GPT2LMHeadModel loads it
"""

from lmforge import errors, metrics
from lmforge.char_tokenizer import CharTokenizer
from lmforge.checkpoint import checkpoint_info, save_pretrained
from lmforge.config import PRESETS, GPTConfig, preset
from lmforge.data import TokenDataset, prepare
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.generation import GenerationConfig
from lmforge.model import GPT, CausalLMOutput, KVCache, attention_reference, lm_loss, load_model
from lmforge.tasks import GPTForSequenceClassification, apply_lora, merge_lora, pipeline
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "CausalLMOutput", "PRESETS", "preset", "load_model", "save_pretrained",
    "checkpoint_info", "attention_reference", "lm_loss", "errors", "LmforgeError", "ConfigError",
    "CheckpointError", "DataError", "__version__",
    "Tokenizer", "CharTokenizer", "TokenDataset", "prepare", "GenerationConfig", "metrics",
    "pipeline", "GPTForSequenceClassification", "apply_lora", "merge_lora",
]
