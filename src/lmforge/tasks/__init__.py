"""Fine-tuning and task pipelines: a classification head, supervised fine-tuning data (prompt
templates, prompt masking, truncation, packing), LoRA adapters, and `pipeline()`.

    clf = GPTForSequenceClassification.from_pretrained("gpt2", labels=["negative", "positive"])
    model = apply_lora(load_model("gpt2"), rank=8, alpha=16, targets=["c_attn"])
    pipe = pipeline("sentiment-analysis", model="runs/sst2/best"); pipe("a great film")
"""

from lmforge.tasks.classification import (
    Classifier, GPTForSequenceClassification, classification_loss, load_classifier,
)
from lmforge.tasks.lora import LoRALinear, LoRAModel, apply_lora, load_lora, merge_lora
from lmforge.tasks.pipelines import pipeline
from lmforge.tasks.sft import TEMPLATES, SFTTemplate, build_sft_examples, collate_sft

__all__ = [
    "GPTForSequenceClassification", "Classifier", "load_classifier", "classification_loss",
    "LoRALinear", "LoRAModel", "apply_lora", "merge_lora", "load_lora",
    "SFTTemplate", "TEMPLATES", "build_sft_examples", "collate_sft", "pipeline",
]
