"""`pipeline(task, model=..., tokenizer=..., device=...)`: the five applications, called like
Hugging Face pipelines and returning the same shapes of results.

    pipeline("text-generation", model="gpt2")("Once upon a time")       -> [{"generated_text": ...}]
    pipeline("sentiment-analysis", model=DIR)(["good", "bad"])          -> [{"label", "score"}, ...]
    pipeline("translation", model=DIR)("A man is running.")             -> [{"translation_text": ...}]
    pipeline("summarization", model=DIR)(document)                      -> [{"summary_text": ...}]
    pipeline("question-answering", model=DIR)(question=q, context=c)    -> {"answer", "score", "start", "end"}

Translation, summarization and QA are generative: the prompt is the SFT template the model was
fine-tuned with (recorded in its config.json; the task default otherwise), decoding is greedy and
the answer is the first line of the continuation. A QA answer that occurs in the context also gets
its character span (start, end); its score is the probability the model gives the answer tokens.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.model import load_model
from lmforge.quantize import check_mode, quantize_model
from lmforge.tasks.sft import CONFIG_KEY, TEMPLATES, SFTTemplate

TASK_ALIASES = {
    "text-generation": "text-generation",
    "sentiment-analysis": "text-classification",
    "text-classification": "text-classification",
    "translation": "translation",
    "summarization": "summarization",
    "question-answering": "question-answering",
}
MAX_NEW_TOKENS = {"text-generation": 50, "translation": 64, "summarization": 64, "question-answering": 32}


def pipeline(
    task: str, model: Any = None, tokenizer: Any = None, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None, batch_size: int = 8, template: SFTTemplate | None = None,
    quantize: str | None = None,
) -> "Pipeline":
    """A callable for `task` over `model` (a directory, Hub name, or a loaded model).

    tokenizer: a Tokenizer or a path (default: the model directory's). device: where to run
    ("auto" picks cuda, mps, cpu; default: "auto" for a path, the model's own device for an object).
    template: the prompt template of translation / summarization / question answering.
    quantize: "int8" quantizes the model's linear layers (in place for a loaded model; lmforge.quantize).
    """
    kind = TASK_ALIASES.get(task)
    if kind is None and task.startswith("translation_"):
        kind = "translation"  # transformers' "translation_en_to_de" names
    if kind is None:
        raise ConfigError(f"unknown pipeline task {task!r}: use one of {', '.join(TASK_ALIASES)}")
    if model is None:
        raise ConfigError(f"pipeline({task!r}) needs model=: a checkpoint directory, a Hub name or a loaded model")
    model = _load(kind, model, device, dtype, quantize)
    tokenizer = _tokenizer(model, tokenizer)
    cls = {"text-generation": TextGenerationPipeline, "text-classification": TextClassificationPipeline,
           "translation": Text2TextPipeline, "summarization": Text2TextPipeline,
           "question-answering": QuestionAnsweringPipeline}[kind]
    return cls(kind, model, tokenizer, batch_size, template)


def _load(kind: str, model: Any, device: Any, dtype: Any, quantize: str | None = None) -> torch.nn.Module:
    if quantize is not None:
        check_mode(quantize)
    if isinstance(model, (str, os.PathLike)):
        if kind == "text-classification":
            from lmforge.tasks.classification import GPTForSequenceClassification

            classifier = GPTForSequenceClassification.from_pretrained(model, device=device or "auto", dtype=dtype)
            return classifier if quantize is None else quantize_model(classifier, quantize)
        return load_model(model, dtype=dtype, device=device or "auto", quantize=quantize).optimize_for_decoding()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model= must be a path, a Hub name or a model, got {type(model).__name__}")
    if kind == "text-classification" and not hasattr(model, "labels"):
        raise ConfigError("text-classification needs a classifier (GPTForSequenceClassification), not a language model")
    if kind != "text-classification" and hasattr(model, "labels"):
        raise ConfigError(f"{kind} needs a language model; this is a sequence classifier")
    if device is not None or dtype is not None:
        from lmforge.device import resolve_device, resolve_dtype

        model = model.to(device=resolve_device(device) if device is not None else None, dtype=resolve_dtype(dtype))
    if quantize is not None:
        quantize_model(model, quantize)
    return model.eval()


def _tokenizer(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from lmforge.tokenizer import Tokenizer

    source = tokenizer or getattr(model, "checkpoint_dir", None)
    if source is None:
        raise ConfigError("pass tokenizer= (a Tokenizer or a directory): the model was not loaded from a directory")
    return Tokenizer.from_pretrained(source)


class Pipeline:
    """Model + tokenizer + task; `__call__` takes one input or a list and batches internally."""

    def __init__(self, task: str, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8,
                 template: SFTTemplate | None = None) -> None:
        self.task, self.model, self.tokenizer, self.batch_size = task, model, tokenizer, batch_size
        self.template = template or self._saved_template()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _saved_template(self) -> SFTTemplate | None:
        key = {"translation": "translation", "summarization": "summarization", "question-answering": "qa"}.get(self.task)
        if key is None:
            return None
        saved = getattr(self.model, "config", None) and self.model.config.extra.get(CONFIG_KEY)
        if isinstance(saved, dict) and saved.get("task") == key:
            return SFTTemplate.from_dict(saved)
        return TEMPLATES[key]

    def _generate(self, prompts: list[str], **options: Any) -> tuple[list[list[str]], list[list[float]]]:
        """Continuations per prompt (num_return_sequences each), decoded up to the first eos, and
        the log-probability of each kept token; left-padded batches of self.batch_size."""
        eos = self.tokenizer.eos_token_id
        n = options.get("num_return_sequences", 1)
        want_scores = options.pop("_scores", False)
        texts: list[list[str]] = []
        logprobs: list[list[float]] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(prompts[i: i + self.batch_size], padding=True, padding_side="left", return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            keep = self.model.config.n_positions - (options.get("max_new_tokens") or 0)
            if options.get("truncate_prompt") and 0 < keep < ids.size(1):
                # cut here, as generate would, so the new tokens start at ids.size(1) of the output
                ids, mask = ids[:, -keep:], mask[:, -keep:]
            with torch.no_grad():
                out = self.model.generate(ids, mask, tokenizer=self.tokenizer, return_dict_in_generate=True,
                                          output_scores=want_scores, **options)
            new = out.sequences[:, ids.size(1):].tolist()
            lps = out.token_logprobs.tolist() if want_scores and out.token_logprobs is not None else [[] for _ in new]
            for j in range(0, len(new), n):
                group_t, group_l = [], []
                for row, lp in zip(new[j: j + n], lps[j: j + n]):
                    cut = next((k for k, t in enumerate(row) if t == eos), len(row))
                    group_t.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
                    group_l.append(lp[:cut])
                texts.append(group_t)
                logprobs.append(group_l)
        return texts, logprobs


def _as_list(inputs: Any, what: str) -> tuple[list[Any], bool]:
    if isinstance(inputs, (str, dict)):
        return [inputs], True
    if isinstance(inputs, Sequence) and not isinstance(inputs, bytes):
        if not inputs:
            raise DataError(f"{what}: the input list is empty")
        return list(inputs), False
    raise DataError(f"{what}: expected a string or a list of strings, got {type(inputs).__name__}")


class TextGenerationPipeline(Pipeline):
    def __call__(self, text_inputs: str | Sequence[str], return_full_text: bool = True, **generate_kwargs: Any):
        """[{"generated_text"}] per input (num_return_sequences dicts); a list of those for a list."""
        prompts, single = _as_list(text_inputs, "text-generation")
        if not generate_kwargs.get("max_length"):
            generate_kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS["text-generation"])
        if generate_kwargs.get("num_return_sequences", 1) > 1 and generate_kwargs.get("num_beams", 1) == 1:
            generate_kwargs.setdefault("do_sample", True)
        texts, _ = self._generate(prompts, **generate_kwargs)
        results = [[{"generated_text": (p + t) if return_full_text else t} for t in group]
                   for p, group in zip(prompts, texts)]
        return results[0] if single else results


class TextClassificationPipeline(Pipeline):
    def __call__(self, inputs: str | Sequence[str], top_k: int | None = 1):
        """{"label", "score"} per input (a list of the top_k when top_k != 1; top_k=None: all labels)."""
        from lmforge.tasks.classification import Classifier

        texts, _ = _as_list(inputs, "text-classification")
        probs = Classifier(self.model, self.tokenizer, self.batch_size).predict_proba(texts)
        labels = self.model.labels
        results = []
        for row in probs.tolist():
            ranked = sorted(((labels[i], p) for i, p in enumerate(row)), key=lambda x: -x[1])
            dicts = [{"label": label, "score": p} for label, p in ranked[: top_k or len(ranked)]]
            results.append(dicts[0] if top_k == 1 else dicts)
        return results


class Text2TextPipeline(Pipeline):
    """Translation and summarization: the template's document slot takes each input text."""

    def __call__(self, inputs: str | dict | Sequence[str | dict], **generate_kwargs: Any):
        """[{"translation_text"}] / [{"summary_text"}]: one dict per input, in a list."""
        rows, _ = _as_list(inputs, self.task)
        slot = self.template.document_field or next(iter(self.template.fields))
        prompts = [self.template.render_prompt(r if isinstance(r, dict) else {slot: r}, f"{self.task} input {i}")
                   for i, r in enumerate(rows)]
        generate_kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS[self.task])
        generate_kwargs.setdefault("stop_strings", ["\n"])
        generate_kwargs.setdefault("truncate_prompt", True)
        texts, _ = self._generate(prompts, **generate_kwargs)
        key = "translation_text" if self.task == "translation" else "summary_text"
        return [{key: _first_line(group[0])} for group in texts]


class QuestionAnsweringPipeline(Pipeline):
    def __call__(self, *args: Any, question: str | Sequence[str] | None = None,
                 context: str | Sequence[str] | None = None, **generate_kwargs: Any):
        """{"answer", "score", "start", "end"} (a list of them for lists of questions/contexts).

        Called as pipe(question=q, context=c), pipe({"question": q, "context": c}) or with a list
        of such dicts. start/end are the answer's character span in the context (None when the
        generated answer is not a span of it); score = P(answer tokens | prompt).
        """
        if args:
            if question is not None or context is not None or len(args) > 1:
                raise DataError("question-answering: pass question= and context=, or one dict / list of dicts")
            rows, single = _as_list(args[0], "question-answering")
        else:
            if question is None or context is None:
                raise DataError("question-answering needs both question= and context=")
            qs, single = _as_list(question, "question-answering question")
            cs, _ = _as_list(context, "question-answering context")
            if len(cs) == 1 and len(qs) > 1:
                cs = cs * len(qs)
            if len(qs) != len(cs):
                raise DataError(f"question-answering: {len(qs)} questions but {len(cs)} contexts")
            rows = [{"question": q, "context": c} for q, c in zip(qs, cs)]
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or "question" not in r or "context" not in r:
                raise DataError(f"question-answering input {i}: needs 'question' and 'context', got {r!r:.80}")
        prompts = [self.template.render_prompt(r, f"question-answering input {i}") for i, r in enumerate(rows)]
        generate_kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS["question-answering"])
        generate_kwargs.setdefault("stop_strings", ["\n"])
        generate_kwargs.setdefault("truncate_prompt", True)
        generate_kwargs["_scores"] = not generate_kwargs.get("do_sample") and generate_kwargs.get("num_beams", 1) == 1
        texts, logprobs = self._generate(prompts, **generate_kwargs)
        results = [self._answer(r["context"], group[0], lps[0]) for r, group, lps in zip(rows, texts, logprobs)]
        return results[0] if single else results

    def _answer(self, context: str, continuation: str, logprobs: list[float]) -> dict[str, Any]:
        answer = _first_line(continuation)
        # Score only the tokens that made the answer (not what came after the newline).
        kept = len(self.tokenizer.encode(continuation.split("\n", 1)[0], add_special_tokens=False)) if "\n" in continuation else len(logprobs)
        score = float(torch.tensor(logprobs[:kept], dtype=torch.float64).sum().exp()) if logprobs else None
        start = context.find(answer) if answer else -1
        if start < 0:
            return {"answer": answer, "score": score, "start": None, "end": None}
        return {"answer": answer, "score": score, "start": start, "end": start + len(answer)}


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()
