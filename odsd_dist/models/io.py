"""Model weights as safetensors with their metadata, and the shared input normalisation.

Metadata (safetensors keeps str -> str) holds JSON-encoded values: arch, num_classes, in_chans,
input_size, mean, std, class_names and any extra keys, so a weights file alone rebuilds its model
and its preprocessing. Nothing here unpickles: no torch.load, ever.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..errors import UserError
from ..stage import sha256_file
from .registry import build_model

REQUIRED_META = ("arch", "num_classes", "in_chans")
_LUMA = (0.299, 0.587, 0.114)


def _encode_meta(meta: dict) -> dict[str, str]:
    return {str(k): json.dumps(v, sort_keys=True, default=str) for k, v in meta.items()}


def _decode_meta(raw: Optional[dict[str, str]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v  # written by another tool: keep the string
    return out


def _canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted JSON header: the library writes metadata in hash order, so the same
    model would get a different sha256 (the teacher identity in every table) on every save."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_model(model: nn.Module, path: Union[str, os.PathLike], meta: dict) -> Path:
    """Write `model`'s state dict and `meta` (plus arch/num_classes/in_chans/feature_dim from the model) atomically.

    The bytes depend only on the tensors and the metadata, so the same weights always have the same sha256.
    """

    path = Path(path)
    full = {
        "arch": getattr(model, "arch", None),
        "num_classes": getattr(model, "num_classes", None),
        "in_chans": getattr(model, "in_chans", None),
        "feature_dim": getattr(model, "feature_dim", None),
    }
    full.update(meta)
    missing = [k for k in REQUIRED_META if full.get(k) in (None, "")]
    if missing:
        raise ValueError(f"save_model {path}: metadata lacks {missing}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_canonical_safetensors(tensors, _encode_meta(full)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_model_meta(path: Union[str, os.PathLike]) -> dict:
    """The decoded metadata of a weights file (header only; no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _decode_meta(f.metadata())
    except Exception as e:  # SafetensorError, OSError, ValueError from a garbled header
        raise UserError(f"model weights {path}: not a readable safetensors file ({e})") from None
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"model weights {path}: metadata lacks {', '.join(missing)} (not written by odsd?)")
    return meta


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the arch named in the metadata and load the tensors strictly; returns (model in eval mode, meta)."""
    path = Path(path)
    meta = read_model_meta(path)
    try:
        model = build_model(str(meta["arch"]), int(meta["num_classes"]), int(meta["in_chans"]))
    except UserError as e:
        raise UserError(f"model weights {path}: {e}") from None
    try:
        state = load_file(str(path), device=str(map_location))
    except Exception as e:
        raise UserError(f"model weights {path}: tensors unreadable ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"model weights {path}: tensors do not match arch {meta['arch']!r}: "
                        f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}") from None
    model.to(map_location).eval()
    return model, meta


def weights_sha256(path: Union[str, os.PathLike]) -> str:
    """Teacher identity recorded in every table (sha256 of the weights file)."""
    if not Path(path).is_file():
        raise UserError(f"model weights not found: {path}")
    return sha256_file(path)


def _stats(meta: dict, key: str, channels: int, device, default: float) -> torch.Tensor:
    v = meta.get(key)
    if v is None:
        v = [default] * channels
    t = torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise UserError(f"model metadata {key} has {t.numel()} values for {channels} channels")
    return t.view(1, channels, 1, 1)


def normalize(x: Union[np.ndarray, torch.Tensor], meta: dict, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """uint8 N×H×W×C (numpy or torch; HWC for one image) -> float32 N×C×H×W, (x/255 - mean)/std.

    Float input is taken as N×C×H×W already scaled to [0, 1]. Channels follow the model: grey input is
    repeated for an RGB model and RGB is turned to luma for a grey one. The result keeps channels-last
    strides (a free permute of NHWC), which oneDNN convolutions prefer.
    """
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if device is not None:
        t = t.to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"normalize: uint8 input must be NHWC or HWC, got shape {tuple(t.shape)}")
        t = t.permute(0, 3, 1, 2)
        scale = 1.0 / 255.0
    else:
        if t.dim() == 3:
            t = t.unsqueeze(0)
        scale = 1.0
    want = int(meta.get("in_chans", t.shape[1]))
    have = t.shape[1]
    t = t.float()
    if have != want:
        if have == 1:
            t = t.expand(-1, want, -1, -1)
        elif have == 3 and want == 1:
            w = torch.tensor(_LUMA, dtype=torch.float32, device=t.device).view(1, 3, 1, 1)
            t = (t * w).sum(1, keepdim=True)
        else:
            raise ValueError(f"normalize: {have}-channel input for a {want}-channel model")
    mean = _stats(meta, "mean", want, t.device, 0.0)
    std = _stats(meta, "std", want, t.device, 1.0)
    # one fused multiply-add: x * (scale/std) + (-mean/std)
    return torch.addcmul(-mean / std, t, scale / std)
