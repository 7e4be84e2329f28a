"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021).

    h = W x + (alpha / r) B A x,    A: (r, in) ~ Kaiming-uniform,  B: (out, r) = 0

so training starts from exactly the base model and updates r (in + out) numbers per layer instead of
in x out. `apply_lora(model, rank, alpha, targets)` freezes the model, wraps the matching
projections and returns a `LoRAModel`; `merge_lora` folds B A into W for export. A target can be a
part of a projection lmforge fuses (Llama's q_proj: the q rows of attn.c_attn): its pair changes
only those output rows, and several parts of one projection share one wrapped layer.

A LoRAModel's `save_pretrained(dir)` writes the *merged* weights as a normal model directory
(what `lmforge generate`, the server and transformers load) plus the adapters beside them
(`lora_adapter.safetensors`, `lora_config.json`: rank, alpha, targets, modules and their parts, base
model). `load_weights`
restores the adapters (the frozen base is already in place), which is what a resumed run needs;
`lmforge merge-lora` rebuilds a merged directory from a base and an adapter directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge._io import write_atomic, write_json_atomic
from lmforge.checkpoint import copy_state, load_config
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.families import family_for
from lmforge.model import load_model
from lmforge.quantize import Int8Linear, model_quantization, training_refused
from lmforge.tasks.classification import GPTForSequenceClassification, labels_from_config
from lmforge.tokenizer import Tokenizer

ADAPTER_WEIGHTS = "lora_adapter.safetensors"
ADAPTER_CONFIG = "lora_config.json"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus trainable low-rank updates.

    Whole layer: base(x) + scale * B(A(dropout(x))), parameters lora_A (r, in) and lora_B (out, r).
    With `parts` (name -> output rows (start, stop) of a fused projection, e.g. {"q_proj": (0, 64)}),
    each part has its own pair, lora_A_<name> and lora_B_<name> (stop - start, r), and adds
    scale * B A x to its rows only.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 parts: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if isinstance(base, Int8Linear):
            raise training_refused("LoRA on a quantized layer")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.parts = {"": (0, base.out_features)} if parts is None else {p: tuple(rows) for p, rows in parts.items()}
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        for part, (start, stop) in self.parts.items():
            lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
            self.register_parameter(_pair_name("lora_A", part), lora_A)
            self.register_parameter(_pair_name("lora_B", part), nn.Parameter(torch.zeros(stop - start, rank, **kw)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def pairs(self) -> list[tuple[int, int, nn.Parameter, nn.Parameter]]:
        """(start, stop, A, B) for each part (one for a whole layer)."""
        return [(start, stop, getattr(self, _pair_name("lora_A", part)), getattr(self, _pair_name("lora_B", part)))
                for part, (start, stop) in self.parts.items()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, x_in, n_out = self.base(x), self.dropout(x), self.base.out_features
        for start, stop, lora_A, lora_B in self.pairs():
            update = self.scale * ((x_in @ lora_A.t().to(x.dtype)) @ lora_B.t().to(x.dtype))  # (.., stop - start)
            if stop - start != n_out:
                update = F.pad(update, (start, n_out - stop))  # zero outside the part's rows
            out = out + update
        return out

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in each part's rows (zero elsewhere): the (out, in) change merging adds to the base weight."""
        n_out = self.base.out_features
        return sum(F.pad(self.scale * (lora_B.float() @ lora_A.float()), (0, 0, start, n_out - stop))
                   for start, stop, lora_A, lora_B in self.pairs())

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale B A (a new module; this one is unchanged)."""
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.copy_((out.weight.float() + self.delta_weight()).to(out.weight.dtype))
        for p in out.parameters():
            p.requires_grad_(True)
        return out

    def extra_repr(self) -> str:
        parts = "" if list(self.parts) == [""] else f", parts={self.parts}"
        return f"rank={self.rank}, alpha={self.alpha}{parts}"


def _pair_name(matrix: str, part: str) -> str:
    return f"{matrix}_{part}" if part else matrix


def _matches(name: str, target: str) -> bool:
    """A target is a dotted name suffix ("c_attn", "mlp.c_proj", "h.0.attn.c_attn") or a regex (re:...)."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _family(model: nn.Module) -> Any:
    """The Hugging Face family module of a model (its LoRA target names), None for a model without one."""
    family = getattr(getattr(model, "config", None), "family", None)
    return family_for(family) if family is not None else None


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


def _require_plain(model: nn.Module) -> None:
    if isinstance(model, LoRAModel):
        raise ConfigError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    if model_quantization(model) is not None:
        raise training_refused("LoRA")


# What to wrap: module name -> None (one pair on all its rows) or {part name: its (start, stop) rows}.
Layers = dict[str, dict[str, tuple[int, int]] | None]


def apply_lora(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None,
    dropout: float = 0.0, trainable: Sequence[str] | None = None, base_model: str | None = None,
) -> "LoRAModel":
    """Freeze `model`, wrap each nn.Linear whose name matches a target in LoRALinear, return a LoRAModel.

    targets: module-name suffixes, the names of the model's family (GPT-2: c_attn, attn.c_proj, c_fc,
    mlp.c_proj; Llama family: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, where
    q/k/v and gate/up adapt only their rows of lmforge's fused projection), or re:REGEX; default:
    the family's usual choice (GPT-2: c_attn; Llama: q_proj v_proj).
    trainable: names of modules kept fully trainable besides the adapters (default: a
    classifier's "score" head, which starts random and must learn). Targets that match no module
    raise ConfigError listing the projections there are.
    """
    _require_plain(model)
    family = _family(model)
    aliases = family.LORA_TARGETS if family is not None else {}
    if targets is None and family is not None:
        targets = family.LORA_DEFAULT_TARGETS
    if not targets:
        raise ConfigError(f"--lora-targets is empty; name projections such as {' '.join(aliases) or 'a module name suffix'}")
    layers = _resolve_targets(model, targets, aliases)
    return _adapt(model, layers, rank, alpha, dropout, trainable, targets, base_model)


def _resolve_targets(model: nn.Module, targets: Sequence[str], aliases: dict[str, Any]) -> Layers:
    """The layers `targets` name. An alias is a module-name suffix, or (suffix, rows) for a part of a
    fused projection, rows(config) giving its (start, stop); any other target is a suffix or re:REGEX."""
    # The LM head is tied to the token embedding; an adapter there would untie it on merge.
    names = [n for n in _linear_names(model) if not n.endswith("lm_head")]
    whole: dict[str, str] = {}  # module -> the target naming all of it
    parts: dict[str, dict[str, tuple[int, int]]] = {}
    unmatched = []
    for target in targets:
        spec = aliases.get(target, target)
        suffix, rows = (spec, None) if isinstance(spec, str) else spec
        hits = [n for n in names if _matches(n, suffix)]
        if not hits:
            unmatched.append(target)
        for name in hits:
            if rows is None:
                whole[name] = target
            else:
                parts.setdefault(name, {})[target] = rows(model.config)
    if unmatched:
        short = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names})  # without the block index
        raise ConfigError(f"LoRA target(s) {unmatched} match no linear module; the model's projections are "
                          f"{', '.join(short)} (give {'one of ' + ', '.join(aliases) + ', ' if aliases else ''}a name suffix, or re:REGEX)")
    both = sorted(whole.keys() & parts.keys())
    if both:
        raise ConfigError(f"LoRA targets {whole[both[0]]!r} and {', '.join(map(repr, parts[both[0]]))} both adapt "
                          f"{both[0]}; name the whole projection or its parts, not both")
    return {name: parts.get(name) for name in sorted({*whole, *parts})}


def _adapt(model: nn.Module, layers: Layers, rank: int, alpha: float, dropout: float,
           trainable: Sequence[str] | None, targets: Sequence[str] | None, base_model: str | None) -> "LoRAModel":
    """Freeze `model`, wrap `layers` in LoRALinear, unfreeze `trainable`: the LoRAModel whose
    settings (lora_config.json) record all of it."""
    if trainable is None:
        trainable = ["score"] if hasattr(model, "score") else []
    shapes = {}
    for name, parts in layers.items():
        layer = model.get_submodule(name)
        for part, (start, stop) in (parts or {"": (0, layer.out_features)}).items():
            shapes[f"{name} ({part})" if part else name] = (layer.in_features, stop - start)
    check_rank(rank, shapes)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, parts))
    for name in trainable:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"trainable module {name!r} does not exist in the model") from None
        for p in module.parameters():
            p.requires_grad_(True)
    settings = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets or []),
                "modules": list(layers), "trainable": list(trainable), "base_model": base_model}
    recorded = {name: {part: list(rows) for part, rows in parts.items()} for name, parts in layers.items() if parts}
    if recorded:  # adapters on whole layers only keep the format they always had
        settings["parts"] = recorded
    return LoRAModel(model, settings)


def check_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """A rank must be at least 1 and at most the width (min(in, out)) of every adapted layer or part
    (`shapes`: name -> (in, out)): beyond it B A has more numbers than the full update and no more
    expressive power."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank!r} (--lora-rank: try 4, 8 or 16)")
    too_narrow = {n: min(shape) for n, shape in shapes.items() if rank > min(shape)}
    if too_narrow:
        name, width = min(too_narrow.items(), key=lambda kv: kv[1])
        raise ConfigError(f"LoRA rank {rank} exceeds the width of {len(too_narrow)} adapted layer(s), e.g. {name} "
                          f"({shapes[name][0]} -> {shapes[name][1]}, width {width}); use --lora-rank <= {width}")


def merge_lora(model: nn.Module) -> nn.Module:
    """The model with every adapter folded into its base weight: a plain model (a new object for
    a LoRAModel, whose own weights are untouched), with all parameters trainable again."""
    inner = copy.deepcopy(model.model if isinstance(model, LoRAModel) else model)
    for name, module in list(inner.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.merged())
    for p in inner.parameters():
        p.requires_grad_(True)
    return inner


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters; tied weights count once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.3f}%)"


class LoRAModel(nn.Module):
    """A model with LoRA adapters. Calls and attributes go to the wrapped model (`.model`);
    saving writes merged weights plus the adapters, loading restores the adapters."""

    def __init__(self, model: nn.Module, settings: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.lora_settings = settings

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self.model, "gradient_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (the adapters and any `trainable` module), by the wrapped model's names."""
        return {name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters() if p.requires_grad}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """lora_adapter.safetensors + lora_config.json (atomic writes)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state_dict()
        write_atomic(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        write_json_atomic(directory / ADAPTER_CONFIG, self.lora_settings)
        return directory

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str | None = None,
                        tokenizer: Any = None) -> None:
        """A normal model directory of the merged weights, with the adapters beside it."""
        merge_lora(self).save_pretrained(directory, max_shard_size=max_shard_size, tokenizer=tokenizer)
        self.save_adapter(directory)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Restore the adapters (and trainable modules) save_pretrained wrote, in place and strictly."""
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        copy_state(self.model, read_adapter(directory), Path(directory) / ADAPTER_WEIGHTS, keys=trainable,
                   hint="were the adapters made with the same --lora-rank and --lora-targets?")


def read_adapter(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a LoRA adapter directory holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt") from None


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a LoRA adapter directory holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for key in ("rank", "alpha", "modules"):
        if key not in settings:
            raise CheckpointError(f"{path}: no {key!r} key; was it written by lmforge?")
    return settings


def load_lora(base: nn.Module, directory: str | os.PathLike) -> LoRAModel:
    """Put the adapters of `directory` on `base` (the model they were trained from)."""
    _require_plain(base)
    settings = read_adapter_config(directory)
    parts = settings.get("parts", {})  # absent in adapters on whole layers (and those written before parts)
    layers = {m: {p: tuple(rows) for p, rows in parts[m].items()} if m in parts else None for m in settings["modules"]}
    missing = sorted(set(layers) - set(_linear_names(base)))
    if missing:
        raise CheckpointError(f"{Path(directory) / ADAPTER_CONFIG}: adapters on {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                              f"which the base model does not have; is it the model they were trained on?")
    model = _adapt(base, layers, settings["rank"], settings["alpha"], settings.get("dropout", 0.0),
                   settings.get("trainable", []), settings.get("targets"), settings.get("base_model"))
    model.lora_settings = settings
    model.load_weights(directory)
    return model.eval()


def merge_lora_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
                   tokenizer: str | None = None) -> nn.Module:
    """`lmforge merge-lora`: base model + the adapters of `adapter_dir` -> a merged model directory.

    The base is `base` or the base_model recorded in lora_config.json; a classifier's adapters
    (with a trained `score` head) are put on the base read as a classifier with the adapter
    directory's labels. Returns the merged model.
    """
    settings = read_adapter_config(adapter_dir)
    base = base or settings.get("base_model")
    if not base:
        raise ConfigError(f"{Path(adapter_dir) / ADAPTER_CONFIG} records no base model; pass --base PATH_OR_NAME")
    if "score.weight" in read_adapter(adapter_dir):
        labels = labels_from_config(load_config(adapter_dir))
        model: nn.Module = GPTForSequenceClassification.from_pretrained(base, labels=labels, device="cpu")
    else:
        model = load_model(base, device="cpu")
    merged = merge_lora(load_lora(model, adapter_dir))
    tok = None
    for source in (tokenizer, adapter_dir, base):
        if source is None:
            continue
        try:
            tok = Tokenizer.from_pretrained(source)
            break
        except (LmforgeError, OSError):  # no tokenizer files there: try the next place
            continue
    merged.save_pretrained(out_dir, tokenizer=tok)
    return merged
