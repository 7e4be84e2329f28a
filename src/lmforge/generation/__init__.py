"""Text generation: GenerationConfig, the pure sampling filters, the decoding loops, streaming.

    ids = model.generate(input_ids, attention_mask, max_new_tokens=50, do_sample=True, top_p=0.9)
    for piece in stream_text(model, tokenizer, "Once upon a time", max_new_tokens=50): print(piece, end="")
"""

from lmforge.generation.beam import beam_search
from lmforge.generation.config import GenerationConfig
from lmforge.generation.decode import DecodeStep, Decoder, generate
from lmforge.generation.request import GenerationOutput, resolve_config
from lmforge.generation.sampling import (
    Sampler, apply_logit_bias, apply_presence_frequency_penalty, apply_repetition_penalty, apply_temperature,
    ban_repeated_ngrams, greedy_token, make_logits_processor, sample_token, suppress_tokens, top_k_filter,
    top_p_filter,
)
from lmforge.generation.stops import StopStrings
from lmforge.generation.stream import IncrementalDecoder, stream, stream_text

__all__ = [
    "GenerationConfig", "GenerationOutput", "DecodeStep", "Decoder", "generate", "beam_search",
    "resolve_config", "stream", "stream_text", "IncrementalDecoder",
    "apply_repetition_penalty", "ban_repeated_ngrams", "suppress_tokens", "apply_temperature",
    "top_k_filter", "top_p_filter", "greedy_token", "sample_token", "make_logits_processor",
    "apply_logit_bias", "apply_presence_frequency_penalty", "Sampler", "StopStrings",
]
