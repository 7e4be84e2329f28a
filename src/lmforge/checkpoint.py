"""Load and save Hugging Face GPT-2 checkpoint directories.

A directory holds config.json plus weights in one of: model.safetensors, a sharded
model.safetensors.index.json, pytorch_model.bin, or pytorch_model.bin.index.json. Hugging Face
GPT-2 stores the four attention/MLP projections as Conv1D, i.e. transposed relative to nn.Linear;
that is the only layout difference. Hub names resolve through huggingface_hub and its cache.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge._io import write_atomic, write_json_atomic
from lmforge.config import GPTConfig
from lmforge.device import resolve_device, resolve_dtype
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import GPT

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Preference order, as in transformers: a single file before an index, safetensors before pickle.
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)

# nn.Linear in lmforge, Conv1D (weight transposed) in Hugging Face GPT-2.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Wrapper prefixes from torch.compile and DDP/FSDP, accepted on load and never written.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Causal-mask buffers that older GPT-2 checkpoints carry; the mask is built on the fly here.
_LEGACY_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
_HUB_PATTERNS = [
    CONFIG_NAME, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "lmforge_tokenizer.json",
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
    return _hub_snapshot(name, revision, require_weights)


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
        raise CheckpointError(f"Hub repo {name!r} has no GPT-2 weights ({', '.join(WEIGHT_FILES)})")
    return directory


# ---- reading ---------------------------------------------------------------------------------


def load_config(directory: str | os.PathLike) -> GPTConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs config.json next to its weights")
    try:
        return GPTConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weight file; download or save the checkpoint again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, download or save it again"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e}); the file is truncated, corrupt, "
            f"or holds objects other than tensors"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def read_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a checkpoint directory (any of the four layouts) and the file they came from."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path), path
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index (needs a 'weight_map' object): {e}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weight_file(directory / shard))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index are missing from their shards: {missing[:5]}")
        return state, path
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)} (found: {', '.join(present) or 'nothing'})"
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _bias_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The bias tensors a Hugging Face GPT-2 of this shape has (all of them; a bias-free model has none)."""
    e, shapes = config.n_embd, {"transformer.ln_f.bias": (config.n_embd,)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.bias": (e,), h + "attn.c_attn.bias": (3 * e,), h + "attn.c_proj.bias": (e,),
                       h + "ln_2.bias": (e,), h + "mlp.c_fc.bias": (config.inner_dim,), h + "mlp.c_proj.bias": (e,)})
    return shapes


def _drop_zero_biases(state: dict[str, torch.Tensor], config: GPTConfig) -> None:
    """A bias-free model's checkpoint carries zero biases for transformers; drop them, refusing non-zero ones."""
    for key in _bias_shapes(config):
        tensor = state.pop(key, None)
        if tensor is not None and bool(tensor.count_nonzero()):
            raise CheckpointError(
                f"tensor {key!r} is not zero, but config.json says bias=false (a bias-free model); the weights were "
                f"changed by a tool that kept the biases: remove \"bias\": false from config.json to load them"
            )


def hf_to_lmforge(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict onto lmforge's parameter names (transposing Conv1D)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = _strip_prefixes(key)
        if _LEGACY_BUFFER.search(key):
            continue
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key  # a bare GPT2Model checkpoint
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[key] = tensor
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # the same tensor as wte
    if not config.bias:
        _drop_zero_biases(out, config)
    return out


def lmforge_to_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a Hugging Face GPT2LMHeadModel expects: Conv1D layout, no tied duplicate, and
    zero biases for a bias-free model (transformers' GPT-2 always has them)."""
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        key = _strip_prefixes(key)
        if tied and key == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[key] = tensor.contiguous().cpu()
    if config is not None and not getattr(config, "bias", True):
        dtype = out["transformer.wte.weight"].dtype
        out.update({k: torch.zeros(shape, dtype=dtype) for k, shape in _bias_shapes(config).items()})
    return out


def load_model(
    path_or_name: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    revision: str | None = None,
) -> GPT:
    """Load a GPT-2 checkpoint: a local directory or a Hugging Face Hub name such as "gpt2".

    dtype: None keeps the checkpoint's dtype; "bf16", "fp16", "fp32" (or torch dtypes) convert.
    Raises CheckpointError naming the file or key when something does not fit.
    """
    directory = resolve_checkpoint_dir(path_or_name, revision)
    config = load_config(directory)
    state, source = read_state_dict(directory)
    state = hf_to_lmforge(state, config)
    target_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device)

    with torch.device("meta"):
        model = GPT(config)  # no random init of weights we are about to replace
    expected = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}; the weights do not "
            f"match config.json (n_layer={config.n_layer}, tie_word_embeddings={config.tie_word_embeddings})"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        warnings.warn(f"{source}: ignoring tensors lmforge's GPT does not use: {unexpected[:6]}", stacklevel=2)
    if target_dtype is None:
        target_dtype = state["transformer.wte.weight"].dtype
    tensors = {}
    for key, want in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(t.shape)}, but config.json implies {tuple(want.shape)} "
                f"(n_embd={config.n_embd}, n_head={config.n_head}, vocab_size={config.vocab_size}, "
                f"n_positions={config.n_positions}); the config and weights are from different models"
            )
        tensors[key] = t.to(device=target_device, dtype=target_dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte's Parameter
    model.checkpoint_dir = directory  # where tokenizer files may live, for the tokenizer loader
    return model.eval()


def load_weights(model: GPT, directory: str | os.PathLike) -> None:
    """Copy the weights of a checkpoint directory into an existing model, in place and strictly.

    Used to restore a training run: the model keeps its device, dtype, parameters (so an optimizer
    built over them stays valid) and wrappers. Raises CheckpointError on a missing or misshapen tensor.
    """
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state, source = read_state_dict(directory)
    state = hf_to_lmforge(state, model.config)
    own = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, the model has "
                                      f"{tuple(target.shape)}")
            target.copy_(state[key])


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
    model: torch.nn.Module,
    directory: str | os.PathLike,
    max_shard_size: int | str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write config.json + model.safetensors (sharded above max_shard_size) loadable by transformers.

    Each file is written atomically, weights before config; weight files of an earlier save in
    another layout are removed only after the new ones are in place.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config: GPTConfig = model.config
    directory = Path(directory)
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

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_json_atomic(directory / CONFIG_NAME, hf_config)
    for stale in [*directory.glob("model*.safetensors"), directory / SAFE_INDEX, directory / BIN_WEIGHTS, directory / BIN_INDEX, *directory.glob("pytorch_model-*.bin")]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


# ---- describing ------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    directory: Path
    config: GPTConfig
    num_parameters: int
    dtypes: list[str]
    size_on_disk: int
    weights_file: str


def checkpoint_info(path_or_name: str | os.PathLike, revision: str | None = None) -> CheckpointInfo:
    """Architecture, parameter count, dtype and size on disk, reading only tensor headers where possible."""
    directory = resolve_checkpoint_dir(path_or_name, revision)
    config = load_config(directory)
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        read_state_dict(directory)  # raises the "no weights found" error
    files = [weights]
    if weights.name.endswith(".index.json"):
        try:
            shard_names = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{weights}: not a valid shard index: {e}") from None
        files = [directory / s for s in shard_names]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        shapes.update(_tensor_headers(f))
    state_keys = {_strip_prefixes(k): v for k, v in shapes.items() if not _LEGACY_BUFFER.search(k)}
    if config.tie_word_embeddings:
        state_keys.pop("lm_head.weight", None)
    n_params = sum(_numel(shape) for shape, _ in state_keys.values())
    dtypes = sorted({dtype for _, dtype in state_keys.values()})
    size = sum(f.stat().st_size for f in files if f.is_file())
    return CheckpointInfo(directory, config, n_params, dtypes, size, weights.name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def _tensor_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()))
                        for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e}); the file is truncated or corrupt") from None
    state = _read_weight_file(path)
    return {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()}
