"""Pretrained weights: PyTorch checkpoints -> converted files -> parameters of a Flax model.

A converted file is a safetensors file whose keys are our parameter paths joined by '/'
(`layer1/0/conv1/kernel`, `blocks/3/attn/qkv/kernel`, `bn1/mean`), already in Flax layout, with
metadata naming the source and architecture. Loading matches keys by path: backbone weights load,
parts the checkpoint lacks (attention modules, a triple head) keep their fresh initialisation,
and a head with another class count is left fresh; the report lists every key in each group.

PyTorch files are read with `torch.load(weights_only=True)` or safetensors, so loading weights
never runs code from the file. Paths may be buckets (`gs://...`): such files are copied to a
local temporary file first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
from collections.abc import Iterator
from typing import Mapping

import numpy as np
from etils import epath

from her2jax import files
from her2jax.errors import BadInput, InvalidSetting, MissingInput

FORMAT = "her2jax-pretrained/1"
SOURCES = ("torchvision", "timm", "hf", "hf-cvt", "timm-swin")


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict as float32 numpy arrays, from `.safetensors`, `.pth`/`.pt`/`.bin`.

    Wrapped checkpoints ({'state_dict': ...}, {'model': ...}) are unwrapped.
    """
    with _local_copy(path, "checkpoint") as local:
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.numpy import load_file
            try:
                arrays = load_file(local)
            except SafetensorError as error:   # a corrupt header, a truncated file, not one
                raise BadInput(f"{path}: not a readable .safetensors file "
                               f"({_one_line(error)})") from None
            return {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        try:
            import torch
        except ImportError:
            raise InvalidSetting(f"{path}: reading a PyTorch .pth/.pt/.bin file needs torch, which "
                                 f"`make setup` leaves out: pip install torch (CPU is enough), or "
                                 f"convert a .safetensors file") from None
        try:
            loaded = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle refusing code, truncated file, not a torch file
            raise BadInput(f"{path}: not a plain PyTorch state dict of tensors "
                           f"({_one_line(error)}); only tensors are read from such files, "
                           "never code") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise BadInput(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return {k: v.detach().float().numpy() for k, v in loaded.items() if hasattr(v, "detach")}


def hf_vit_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HuggingFace ViT / ViT-MAE encoder keys -> timm keys (query, key, value fused into qkv).

    Both the hub checkpoints' names (`encoder.layer.N.attention.attention.query`) and those of
    transformers 5 modules (`layers.N.attention.q_proj`) are read; a `vit.` prefix is dropped and
    anything else (MAE decoder, pooler, classifier) is left out.
    """
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    layer_parts = {
        "layernorm_before": "norm1", "layernorm_after": "norm2",
        "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
        "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
        "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
        "attention.attention.query": "q", "attention.q_proj": "q",
        "attention.attention.key": "k", "attention.k_proj": "k",
        "attention.attention.value": "v", "attention.v_proj": "v",
    }
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vit.")
        layer = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in renames:
            out[renames[key]] = value
        elif layer and layer.group(2) in layer_parts:
            index, part, leaf = layer.groups()
            target = layer_parts[part]
            if target in ("q", "k", "v"):
                qkv.setdefault((index, leaf), {})[target] = value
            else:
                out[f"blocks.{index}.{target}.{leaf}"] = value
    for (index, leaf), parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.{leaf}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def convert(source: str, state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch keys of `source` -> our parameter paths, in Flax layout."""
    if source == "torchvision":
        from her2jax.models.resnet import from_torchvision
        return from_torchvision(state_dict)
    if source in ("timm", "hf"):
        from her2jax.models.vit import from_timm
        return from_timm(hf_vit_to_timm(state_dict) if source == "hf" else state_dict)
    if source == "hf-cvt":
        from her2jax.models.cvt import from_transformers_cvt
        return from_transformers_cvt(state_dict)
    if source == "timm-swin":
        from her2jax.models.swin import from_timm_swin
        return from_timm_swin(state_dict)
    raise InvalidSetting(f"unknown source {source!r}; expected one of {SOURCES}")


def save(arrays: Mapping[str, np.ndarray], path: str, **metadata: str) -> None:
    from safetensors.numpy import save as save_bytes

    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(target, save_bytes({k: np.ascontiguousarray(v, np.float32)
                                          for k, v in arrays.items()},
                                         metadata={"format": FORMAT, **metadata}))


def _one_line(error: Exception) -> str:
    """A library's error in one line: its most telling line, without advice to load code."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()
             and "weights_only" not in line]
    telling = [line for line in lines if "Unsupported global" in line or "error" in line.lower()]
    return ((telling or lines or [type(error).__name__])[0])[:300]


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A converted file: (arrays by parameter path, metadata)."""
    from safetensors import SafetensorError, safe_open

    with _local_copy(path, "converted weights") as local:
        try:
            handle = safe_open(local, framework="numpy")
        except SafetensorError as error:   # a corrupt header, a truncated file, not one
            raise BadInput(f"{path}: not a readable converted weight file "
                           f"({_one_line(error)}); convert it with python -m her2jax.convert"
                           ) from None
        with handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise BadInput(f"{path} is not a converted her2jax checkpoint (format "
                               f"{metadata.get('format')!r}); convert it with python -m "
                               f"her2jax.convert")
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata


@contextlib.contextmanager
def _local_copy(path: str, what: str) -> Iterator[str]:
    """`path` itself when local, else a temporary local copy of the remote file."""
    source = epath.Path(path)
    if not source.is_file():
        raise MissingInput(f"no {what} at {path}")
    if "://" not in str(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="her2jax_weights_") as folder:
        local = epath.Path(folder) / source.name
        local.write_bytes(source.read_bytes())
        yield str(local)


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]          # model parameters the checkpoint lacks: fresh initialisation
    unused: list[str]           # checkpoint entries the model has no place for
    mismatched: list[str]       # same path, other shape (e.g. a head for another class count)
    resized: list[str]          # position embeddings interpolated to the model's grid

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)}, resized {len(self.resized)}, missing (fresh) "
                 f"{len(self.missing)}, shape mismatch (fresh) {len(self.mismatched)}, "
                 f"unused {len(self.unused)}"]
        for name in ("resized", "missing", "mismatched", "unused"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... (+{len(keys) - 12})" if len(keys) > 12 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def load_pretrained(model, source: str | Mapping[str, np.ndarray]) -> LoadReport:
    """Copies matching weights into `model` (in place) and reports what matched.

    `source` is a converted file or a mapping of parameter paths to arrays.
    """
    import jax.numpy as jnp
    from flax import nnx

    arrays = read(source)[0] if isinstance(source, str) else dict(source)
    report = LoadReport([], [], [], [], [])
    updated = []
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        key = "/".join(str(part) for part in path)
        if key not in arrays:
            if isinstance(variable, nnx.Param):
                report.missing.append(key)
            continue
        value = np.asarray(arrays.pop(key))
        if value.shape != variable.shape and key.endswith("pos_embed"):
            value = _resize_pos_embed(value, variable.shape)
            report.resized.append(key)
        if value.shape != variable.shape:
            report.mismatched.append(f"{key} {value.shape}->{tuple(variable.shape)}")
            continue
        updated.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
        report.loaded.append(key)
    report.unused = sorted(arrays)
    nnx.update(model, nnx.from_flat_state(updated))
    return report


def _resize_pos_embed(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from her2jax.models.vit import resize_pos_embed

    prefix = value.shape[1] - _square(value.shape[1])
    new_tokens = shape[1] - prefix
    side = int(round(new_tokens ** 0.5))
    if side * side != new_tokens:
        return value
    return resize_pos_embed(value, (side, side), num_prefix_tokens=prefix)


def _square(tokens: int) -> int:
    """The largest square number of patch tokens in `tokens` (the rest are class tokens)."""
    side = int(tokens ** 0.5)
    return side * side
