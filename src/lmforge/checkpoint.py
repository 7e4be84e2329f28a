"""Load and save Hugging Face checkpoint directories; the one strict state copy every loader uses.

A directory holds config.json plus weights in one of: model.safetensors, a sharded
model.safetensors.index.json, pytorch_model.bin, or pytorch_model.bin.index.json. Tensor names and
layouts are mapped by the model's family module (lmforge.families); this module handles files,
shards, hub names, atomic writes and wrapper prefixes. It works on any model by duck typing
(model.config, model.state_dict()), so it does not import lmforge.model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from lmforge._io import read_json_object, write_atomic, write_json_atomic
from lmforge.config import PRESETS, GPTConfig
from lmforge.device import resolve_device, resolve_dtype
from lmforge.errors import CheckpointError, ConfigError
from lmforge.families import family_for
from lmforge.quantize import (
    check_mode, checkpoint_head_group_size, checkpoint_quantization, is_scale, model_quantization, quantization_config,
    quantize_model,
)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Preference order, as in transformers: a single file before an index, safetensors before pickle.
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)

# generation_config.json keys that lmforge's GenerationConfig has, under the same names.
GENERATION_KEYS = (
    "max_length", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "no_repeat_ngram_size", "num_beams", "num_return_sequences", "length_penalty",
    "early_stopping", "bos_token_id", "eos_token_id", "pad_token_id",
)
# Wrapper prefixes from torch.compile and DDP/FSDP, accepted on load and never written.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Config fields named in a shape error: what decides the shapes of the weights.
_SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions", "tie_word_embeddings")
_HUB_PATTERNS = [
    CONFIG_NAME, GENERATION_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "lmforge_tokenizer.json", "chat_template.jinja",
    "additional_chat_templates/*",
]


# ---- resolving a path or hub name ------------------------------------------------------------


def resolve_checkpoint_dir(
    path_or_name: str | os.PathLike, revision: str | None = None, require_weights: bool = True,
) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub repo id, through huggingface_hub's cache.

    With require_weights=False only config and tokenizer files are fetched (for tokenizer loading).
    """
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        raise CheckpointError(f"{p}: is a file; pass the checkpoint directory that holds config.json and the weights")
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise CheckpointError(f"{name}: no such directory (and not a Hugging Face Hub name like 'gpt2' or 'org/model')")
    try:
        return _hub_snapshot(name, revision, require_weights)
    except CheckpointError as e:
        if name not in PRESETS:
            raise
        # A model name is a directory or a Hub name, never a preset: random weights are asked for by name.
        raise CheckpointError(f"{e}. (For random weights of the preset {name!r}, ask for it: --preset {name}, "
                              f"or preset={name!r} in Python)") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _has_weights(directory: Path) -> bool:
    return any((directory / f).exists() for f in WEIGHT_FILES)


def _hub_snapshot(name: str, revision: str | None, require_weights: bool = True) -> Path:
    from huggingface_hub import constants, snapshot_download

    safe = _HUB_PATTERNS + ["*.safetensors", SAFE_INDEX] if require_weights else _HUB_PATTERNS
    try:
        cached = Path(snapshot_download(name, revision=revision, allow_patterns=safe, local_files_only=True))
        if _has_weights(cached) or not require_weights:
            return cached
    except Exception:  # not cached (or partially): fall through to the download, or the offline error
        pass
    if _hub_offline():
        raise CheckpointError(
            f"{name!r} is not a local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading: run once online (or `hf download {name}`), "
            f"or pass a local checkpoint directory"
        )
    try:
        directory = Path(snapshot_download(name, revision=revision, allow_patterns=safe))
        if not require_weights:
            return directory
        if not _has_weights(directory):  # an older repo with only pickled weights
            directory = Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS + ["pytorch_model*.bin", BIN_INDEX]))
    except Exception as e:
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"check the name and your network, or set HF_HUB_OFFLINE=1 and pass a local directory"
        ) from None
    if not _has_weights(directory):
        raise CheckpointError(f"Hub repo {name!r} has no model weights ({', '.join(WEIGHT_FILES)})")
    return directory


# ---- reading ---------------------------------------------------------------------------------


def load_config(directory: str | os.PathLike) -> GPTConfig:
    path = Path(directory) / CONFIG_NAME
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a file; a checkpoint directory needs the config.json "
                              f"file next to its weights")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs config.json next to its weights")
    try:
        return GPTConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _open_weight_file(path: Path) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]]:
    """The tensor names of one weight file, and its tensors one at a time (read on demand).

    A safetensors file is read tensor by tensor; a pickled .bin is loaded whole and handed out
    entry by entry (each released once the caller lets it go).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weight file; download or save the checkpoint again")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        def unreadable(e: Exception) -> CheckpointError:
            return CheckpointError(
                f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, download or save it again")

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except Exception as e:
            raise unreadable(e) from None

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            with handle as f:
                for key in keys:
                    try:
                        tensor = f.get_tensor(key)
                    except Exception as e:
                        raise unreadable(e) from None
                    yield key, tensor

        return keys, tensors()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e}); the file is truncated, corrupt, "
            f"or holds objects other than tensors"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return list(state), ((key, state.pop(key)) for key in list(state))


def find_weights(directory: str | os.PathLike) -> tuple[Path, list[Path], list[str] | None]:
    """Where a checkpoint directory's weights are (any of the four layouts): the file that names
    them (the weight file or the shard index), the files that hold them, and for an index every
    tensor name it lists (None for a single file)."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, not a weight file; remove or rename it (weights are "
                                  f"one of {', '.join(WEIGHT_FILES)})")
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return path, [path], None
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index (needs a 'weight_map' object): {e}") from None
        return path, [_shard_inside(directory, path, weight_map, shard) for shard in shards], list(weight_map)
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)} (found: {', '.join(present) or 'nothing'})"
    )


def _shard_inside(directory: Path, index: Path, weight_map: dict[str, Any], shard: Any) -> Path:
    """The shard file an index entry names, refused unless it lies inside the checkpoint folder: a
    downloaded index must not make the loader read `../x` or `/etc/passwd`. A symlink may lead to
    the blob store of a Hub cache snapshot (snapshots/REV/f -> ../../blobs/HASH), nowhere else."""
    def entry() -> str:  # the first tensor that names this shard, for the message only
        return next((k for k, v in weight_map.items() if v == shard), shard)

    if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in Path(shard).parts:
        raise CheckpointError(f"{index}: weight_map entry {entry()!r} -> {shard!r} is not a file name inside "
                              f"{directory}; refusing to read it (the index is corrupt or malicious)")
    target = (directory / shard).resolve()
    root = directory.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index}: weight_map entry {entry()!r} -> {shard!r} leads outside {directory} "
                              f"(to {target}); refusing to read it")
    return directory / shard


def _check_listed(source: Path, listed: list[str] | None, read: Iterable[str]) -> None:
    missing = [k for k in listed or () if k not in read]
    if missing:
        raise CheckpointError(f"{source}: tensors listed in the index are missing from their shards: {missing[:5]}")


def stream_state(directory: str | os.PathLike, config: GPTConfig) -> tuple[Path, Iterator[dict[str, torch.Tensor]]]:
    """The file naming a checkpoint's weights, and its tensors in lmforge's names and layouts a few at
    a time, so that a loader holds little more than the model: files are read tensor by tensor, and
    each lmforge tensor comes out as soon as every stored tensor it is made of has been read (the
    family fuses some, e.g. a Llama layer's q, k and v, which may lie in different shards)."""
    source, files, listed = find_weights(directory)
    return source, _stream(source, files, listed, config)


def _stream(source: Path, files: list[Path], listed: list[str] | None,
            config: GPTConfig) -> Iterator[dict[str, torch.Tensor]]:
    family = family_for(config.family)

    def parts_per_name(keys: Iterable[str]) -> Counter[str]:
        return Counter(n for n in (family.name_from_hf(_strip_prefixes(k), config) for k in keys) if n is not None)

    def mapped(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return family.state_from_hf(group, config)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    needed = parts_per_name(listed) if listed is not None else None
    pending: dict[str, dict[str, torch.Tensor]] = {}  # lmforge name -> the stored tensors read so far
    read: set[str] = set()
    for path in files:
        keys, tensors = _open_weight_file(path)
        if needed is None:
            needed = parts_per_name(keys)
        for key, tensor in tensors:
            read.add(key)
            key = _strip_prefixes(key)
            name = family.name_from_hf(key, config)
            if name is None:
                continue
            group = pending.setdefault(name, {})
            group[key] = tensor
            if len(group) >= needed.get(name, 1):
                yield mapped(pending.pop(name))
    _check_listed(source, listed, read)
    if pending:  # parts whose partners never came: the family names what is missing
        yield mapped({k: t for group in pending.values() for k, t in group.items()})


def read_state(directory: str | os.PathLike, config: GPTConfig) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a checkpoint directory in lmforge's names and layouts, and the file they came from."""
    source, chunks = stream_state(directory, config)
    state: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        state.update(chunk)
    return state, source


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a torch.compile and a DDP wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def hf_to_lmforge(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict onto lmforge's parameter names and layouts (config's family decides)."""
    return family_for(config.family).state_from_hf({_strip_prefixes(k): v for k, v in state.items()}, config)


def lmforge_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict transformers expects for this model (its family's names and layouts), on the CPU."""
    model = _unwrap(model)
    state = {_strip_prefixes(k): t.detach() for k, t in model.state_dict().items()}
    config = saved_config(model)
    hf = family_for(config.family).state_to_hf(state, config)
    return {k: t.contiguous().cpu() for k, t in hf.items()}


def saved_config(model: nn.Module) -> GPTConfig:
    """The model's config as a checkpoint records it: with config.json's "quantization_config" exactly
    when the model is quantized (lmforge.quantize), which also tells the family to store the LM head."""
    model = _unwrap(model)
    config = model.config
    extra = {k: v for k, v in config.extra.items() if k != "quantization_config"}
    if model_quantization(model) is not None:
        extra["quantization_config"] = quantization_config(model)
    return config if extra == config.extra else dataclasses.replace(config, extra=extra)


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating-point dtype a checkpoint was saved in (that of its first floating-point tensor;
    quantization scales, always fp32, do not count)."""
    return next((t.dtype for k, t in state.items() if t.is_floating_point() and not is_scale(k)), None)


def _few(keys: list[str], n: int = 6) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def copy_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    keys: Iterable[str] | None = None,
    allow_missing: Iterable[str] = (),
    unexpected: Literal["error", "warn"] = "error",
    assign: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    hint: str = "",
) -> None:
    """Fill `model` from `state` (lmforge's names), strictly: the one state copy every loader uses.

    keys: the model's tensors to fill (default: its whole state dict, a tied weight once). Each must be
    in `state` (except `allow_missing`) with the model's shape; a tensor the model lacks is an error,
    or only a warning with unexpected="warn". Nothing is changed unless everything fits.
    assign=False copies in place: the model keeps its Parameters, device and dtype (an optimizer built
    over them stays valid). assign=True puts the tensors in (for a model built on the meta device),
    moved to `device` and floating-point ones cast to `dtype` (quantization scales stay fp32), and
    ties tied weights again.
    Errors are CheckpointErrors naming `source`, the tensor and what the model's config implies;
    `hint` (what to check) is appended.
    """
    own = model.state_dict(keep_vars=True)
    ties = _ties(own)
    wanted = [k for k in (own if keys is None else keys) if ties.get(k, k) == k]
    config = getattr(model, "config", None)
    summary = ", ".join(f"{f}={getattr(config, f)}" for f in _SHAPE_FIELDS if hasattr(config, f))
    hint = f"; {hint}" if hint else ""
    allowed = set(allow_missing)
    missing = sorted(k for k in wanted if k not in state and k not in allowed)
    extra = sorted(set(state) - set(wanted))
    if missing or (extra and unexpected == "error"):
        problems = ([f"missing tensors {_few(missing)}"] if missing else []) + (
            [f"unexpected tensors {_few(extra)}"] if extra and unexpected == "error" else [])
        raise CheckpointError(f"{source}: does not fit this model ({summary}): {', '.join(problems)}{hint}")
    if extra:
        warnings.warn(f"{source}: ignoring tensors the model does not use: {_few(extra)}", stacklevel=3)
    present = [k for k in wanted if k in state]
    for key in present:
        got, want = tuple(state[key].shape), tuple(own[key].shape)
        if got != want:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {got}, but the model's config implies {want} "
                                  f"({summary}){hint}")
    if not assign:
        with torch.no_grad():
            for key in present:
                own[key].copy_(state[key])
        return
    tensors = {}
    for key in present:
        t = state[key]
        cast = dtype is not None and t.is_floating_point() and not is_scale(key)
        tensors[key] = t.to(device=device, dtype=dtype if cast else t.dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for alias, key in ties.items():  # assign replaced the Parameter the alias shared: share the new one
        if alias != key:
            module, _, name = key.rpartition(".")
            alias_module, _, alias_name = alias.rpartition(".")
            setattr(model.get_submodule(alias_module), alias_name, getattr(model.get_submodule(module), name))


def _ties(own: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each state-dict name -> the first name of its tensor (itself, or the weight a tied alias shares)."""
    canonical: dict[int, str] = {}
    return {key: canonical.setdefault(id(t), key) for key, t in own.items()}


def assign_streamed(
    model: nn.Module,
    chunks: Iterable[dict[str, torch.Tensor]],
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    hint: str = "",
) -> None:
    """Fill a model built on the meta device from a state that comes in `chunks` (lmforge's names),
    placing each chunk (moved to `device`, cast to `dtype`; None: the first floating-point tensor's
    dtype) as it comes, so a loader holds one chunk beside the model. As copy_state(...,
    unexpected="warn", assign=True), with the same errors, but checked chunk by chunk: after an
    error the model is partly filled (build a new one)."""
    wanted = {k for k, first in _ties(model.state_dict(keep_vars=True)).items() if k == first}
    placed: set[str] = set()
    unused: list[str] = []
    for chunk in chunks:
        fits = {k: t for k, t in chunk.items() if k in wanted}
        unused += [k for k in chunk if k not in wanted]
        if dtype is None:
            dtype = stored_dtype(fits)
        copy_state(model, fits, source, keys=fits, assign=True, dtype=dtype, device=device, hint=hint)
        placed.update(fits)
    # An empty state for the tensors never placed: copy_state's "missing tensors" error, when there are any.
    copy_state(model, {}, source, keys=sorted(wanted - placed), hint=hint)
    if unused:
        warnings.warn(f"{source}: ignoring tensors the model does not use: {_few(sorted(unused))}", stacklevel=3)


def load_generation_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    """The generation settings a checkpoint's generation_config.json sets, under GenerationConfig's
    names (eos_token_id may be a list, e.g. Llama 3's <|end_of_text|> and <|eot_id|>); {} without
    the file. transformers applies them to every generate() call that leaves them unset."""
    d = read_json_object(Path(directory) / GENERATION_CONFIG_NAME, CheckpointError)
    return {k: d[k] for k in GENERATION_KEYS if d.get(k) is not None}


def load_pretrained(
    model_class: Callable[[GPTConfig], nn.Module],
    path_or_name: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    quantize: str | None = None,
) -> Any:
    """`model_class(config)` with the weights of a checkpoint: a local directory or a Hub name ("gpt2").

    dtype: None keeps the checkpoint's dtype; "bf16", "fp16", "fp32" (or torch dtypes) convert.
    quantize: "int8" quantizes the linear layers once loaded (lmforge.quantize). A checkpoint saved
    quantized (config.json's quantization_config) loads quantized either way, its int8 weights
    streamed like any others; one of another quantization scheme is refused.
    The model is built on the meta device (no random init of weights about to be replaced) and
    filled tensor by tensor as the files are read (peak memory: the model plus a few tensors). It
    gets `checkpoint_dir` (where tokenizer files may live) and `generation_defaults` (from
    generation_config.json, see load_generation_defaults) and is returned in eval mode. Tensors the
    model does not use are ignored with a warning. Raises CheckpointError naming the file or tensor.
    """
    if quantize is not None:
        check_mode(quantize)
    directory = resolve_checkpoint_dir(path_or_name, revision)
    config = load_config(directory)
    stored = checkpoint_quantization(config, str(directory / CONFIG_NAME))
    generation_defaults = load_generation_defaults(directory)
    source, chunks = stream_state(directory, config)
    with torch.device("meta"):
        model = model_class(config)
        if stored is not None:  # empty int8 layers, filled from the checkpoint's int8 tensors
            quantize_model(model, stored, head_group_size=checkpoint_head_group_size(config))
    hint = "config.json and the weights are from different models"
    if stored is not None:
        hint = f"a quantized checkpoint stores each int8 weight's `<name>_scale` beside it; {hint}"
    assign_streamed(model, chunks, source, dtype=resolve_dtype(dtype), device=resolve_device(device), hint=hint)
    if quantize is not None and stored is None:
        quantize_model(model, quantize)
    model.checkpoint_dir = directory
    model.generation_defaults = generation_defaults
    return model.eval()


def load_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the weights of a checkpoint directory into an existing model, in place and strictly.

    Used to restore a training run: the model keeps its device, dtype, parameters (so an optimizer
    built over them stays valid) and wrappers. Raises CheckpointError on a missing, unexpected or
    misshapen tensor.
    """
    model = _unwrap(model)
    state, source = read_state(directory, model.config)
    copy_state(model, state, source)


# ---- writing ---------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size; write e.g. 2GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * factor)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    max_shard_size: int | str | None = None,
    tokenizer: Any = None,
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Write config.json + model.safetensors (sharded above max_shard_size) loadable by transformers.

    config_updates: config.json keys to set beyond the model config's (a task head's architecture
    and labels). A model's `generation_defaults` go to generation_config.json. Each file is
    written atomically, weights before config; weight files of an earlier save in another layout
    are removed only after the new ones are in place.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    directory = Path(directory)
    config = saved_config(model)
    if tokenizer is not None:
        config = with_tokenizer_ids(config, tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    state = lmforge_to_hf(model)
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None

    if limit is None or total <= limit:
        written = {SAFE_WEIGHTS}
        write_atomic(directory / SAFE_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    else:
        shards = _shards(state, limit)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            write_atomic(directory / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
            weight_map.update({k: name for k in shard})
        write_json_atomic(directory / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = set(names) | {SAFE_INDEX}

    hf_config = {**config.to_hf_dict(), **(config_updates or {})}
    hf_config["torch_dtype"] = str(stored_dtype(state) or next(iter(state.values())).dtype).removeprefix("torch.")
    write_json_atomic(directory / CONFIG_NAME, hf_config)
    generation_defaults = getattr(model, "generation_defaults", None)
    if generation_defaults:  # what generation_config.json said when the model was loaded
        write_json_atomic(directory / GENERATION_CONFIG_NAME, generation_defaults)
    for stale in [*directory.glob("model*.safetensors"), directory / SAFE_INDEX, directory / BIN_WEIGHTS, directory / BIN_INDEX, *directory.glob("pytorch_model-*.bin")]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def with_tokenizer_ids(config: GPTConfig, tokenizer: Any) -> GPTConfig:
    """The config with the special ids of the tokenizer a model is saved with, so that config.json,
    generate(), `run` and `serve` agree on where text ends. The tokenizer's eos wins unless the
    config's eos list already holds it (Llama 3 stops at several ids); a role the tokenizer does not
    set keeps the config's id. A tokenizer with ids past the model's vocabulary is refused."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {size} ids but the model's vocabulary has {config.vocab_size}: ids "
            f"{config.vocab_size}..{size - 1} would index past the embedding; save the model with the tokenizer "
            f"it was trained with")
    updates: dict[str, Any] = {}
    for name in ("bos_token_id", "pad_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None and token != getattr(config, name):
            updates[name] = token
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in config.eos_token_ids:
        updates["eos_token_id"] = eos
    return dataclasses.replace(config, **updates) if updates else config


# ---- describing ------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    directory: Path
    config: GPTConfig
    num_parameters: int
    dtypes: list[str]
    size_on_disk: int
    weights_file: str
    quantization: dict[str, Any] | None = None  # config.json's quantization_config, as written


def checkpoint_info(path_or_name: str | os.PathLike, revision: str | None = None) -> CheckpointInfo:
    """Architecture, parameter count, dtype and size on disk, reading only tensor headers where possible."""
    directory = resolve_checkpoint_dir(path_or_name, revision)
    config = load_config(directory)
    weights, files, _ = find_weights(directory)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        shapes.update(_tensor_headers(f))
    name_from_hf = family_for(config.family).name_from_hf
    state_keys = {k: v for k, v in shapes.items() if name_from_hf(_strip_prefixes(k), config) is not None}
    n_params = sum(_numel(shape) for k, (shape, _) in state_keys.items() if not is_scale(k))
    dtypes = sorted({dtype for _, dtype in state_keys.values()})
    size = sum(f.stat().st_size for f in files if f.is_file())
    return CheckpointInfo(directory, config, n_params, dtypes, size, weights.name,
                          config.extra.get("quantization_config"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _tensor_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()))
                        for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e}); the file is truncated or corrupt") from None
    return {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in _open_weight_file(path)[1]}
