"""Vectorised two-view augmentation on uint8 batches, run inside Ray Data's map_batches.

A strong view is one `grid_sample` for the whole batch (the random-resized crop and flip as per-sample
affine grids) and per-sample colour-jitter factors; the weak view (flip + pad-crop) is one exact integer
gather, `shift_flip`, which teacher training uses too.
Randomness is per row: row i's numbers are a hash of (run seed, epoch, its idx, draw number)
(`RowRandom`), so a row gets the same augmentation whatever batch it lands in, wherever Ray Data cuts
the batches, and a different one in every epoch.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def _grid_sample(x: torch.Tensor, theta: np.ndarray, size: int, padding: str) -> torch.Tensor:
    grid = F.affine_grid(torch.from_numpy(theta).float(), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def weak_params(n: int, rng: np.random.Generator, pad: int, flip: bool) -> np.ndarray:
    """(n, 3) int8: horizontal sign (+1/-1) and the integer x/y shifts of `n` weak views."""
    sx = np.where(rng.random(n) < 0.5, -1, 1) if flip else np.ones(n, np.int64)
    dx = rng.integers(-pad, pad + 1, n) if pad else np.zeros(n, np.int64)
    dy = rng.integers(-pad, pad + 1, n) if pad else np.zeros(n, np.int64)
    return np.stack([sx, dx, dy], 1).astype(np.int8)


def shift_flip(x: torch.Tensor, flip: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
               channels_last: bool = False) -> torch.Tensor:
    """Row i of `x` mirrored left-right where flip[i], then shifted: out[y, x'] = in[y + dy[i], x' + dx[i]]
    (x' counted from the right when mirrored), zeros outside. One exact integer gather for the batch, any
    dtype; x is N x C x H x W, or N x H x W x C with `channels_last`. The weak view of distillation and the
    crop-and-flip of teacher training are both this."""
    b = x.shape[0]
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad = int(max(dx.abs().max(), dy.abs().max())) if b else 0
    if pad:
        x = F.pad(x, (0, 0, pad, pad, pad, pad) if channels_last else (pad, pad, pad, pad))
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + (dx[:, None] + pad)
    rows = torch.arange(h) + (dy[:, None] + pad)
    n = torch.arange(b)
    if channels_last:
        return x[n[:, None, None], rows[:, :, None], cols[:, None, :]]
    return x[n[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows[:, None, :, None],
             cols[:, None, None, :]]


def weak_from_params(x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The weak views given by `params` (weak_params): flip + zero-padded integer shift, exactly."""
    p = torch.from_numpy(np.asarray(params, np.int64))
    return shift_flip(x, p[:, 0] < 0, p[:, 1], p[:, 2])


def weak_view(x: torch.Tensor, rng: np.random.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Flip + pad-crop (zero padding, integer shifts of up to `pad` pixels); x float N x C x H x W in [0, 255]."""
    return weak_from_params(x, weak_params(x.shape[0], rng, pad, flip))


def strong_view(x: torch.Tensor, rng: np.random.Generator, aug) -> torch.Tensor:
    """Random-resized crop + flip + colour jitter (brightness, contrast, saturation) for the whole batch."""
    n, c, h, w = x.shape
    area = rng.uniform(aug.crop_scale_min, 1.0, n)
    log_r = rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), n)
    ratio = np.exp(log_r)
    cw = np.clip(np.sqrt(area * ratio), 0.05, 1.0)  # crop width / image width
    ch = np.clip(np.sqrt(area / ratio), 0.05, 1.0)
    cx = rng.uniform(-1.0, 1.0, n) * (1.0 - cw)
    cy = rng.uniform(-1.0, 1.0, n) * (1.0 - ch)
    sx = np.where(rng.random(n) < 0.5, -1.0, 1.0) if aug.flip else np.ones(n)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = cw * sx
    theta[:, 1, 1] = ch
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    y = _grid_sample(x, theta, h, "reflection")
    on = torch.from_numpy(rng.random(n) < aug.jitter_prob).view(n, 1, 1, 1)

    def factors(strength: float) -> torch.Tensor:
        f = rng.uniform(max(0.0, 1 - strength), 1 + strength, n)
        return torch.from_numpy(f).float().view(n, 1, 1, 1)

    if aug.brightness:
        y = torch.where(on, y * factors(aug.brightness), y)
    if aug.contrast:
        grey = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
        y = torch.where(on, (y - grey) * factors(aug.contrast) + grey, y)
    if aug.saturation and c == 3:
        grey = _grey(y)
        y = torch.where(on, (y - grey) * factors(aug.saturation) + grey, y)
    return y.clamp_(0.0, 255.0)


def _grey(y: torch.Tensor) -> torch.Tensor:
    if y.shape[1] == 1:
        return y
    w = torch.tensor(_LUMA, dtype=y.dtype).view(1, 3, 1, 1)
    return (y * w).sum(1, keepdim=True)


def normalise(y: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 255] float N x C x H x W -> (y/255 - mean)/std, the model's input statistics."""
    c = y.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
    return (y / 255.0 - m) / s


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VIEW_TAG = 0x7C_AC4E  # keeps the stored-view pick independent of the augmentation draws
_MASK = 0xFFFF_FFFF_FFFF_FFFF


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class RowRandom:
    """The part of np.random.Generator the views draw from (`random`, `uniform`, `integers`, each with
    size = batch rows), counter-based per row: draw d of row i is a hash of (row key i, d), vectorised.

    A Generator drawing for a whole batch would make a row's numbers depend on its batch's first row and
    on its position in the batch, i.e. on where Ray Data cuts batches (not reproducible, and a resumed
    run would cut them elsewhere).
    """

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, np.uint64)
        self.draws = 0

    def random(self, n: int) -> np.ndarray:
        if n != len(self.keys):
            raise ValueError(f"RowRandom draws one number per row: asked {n}, has {len(self.keys)} rows")
        self.draws += 1
        with np.errstate(over="ignore"):
            z = _mix64(self.keys + np.full(n, self.draws, np.uint64) * _GOLDEN)
        return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 random bits in [0, 1)

    def uniform(self, low: float, high: float, n: int) -> np.ndarray:
        return low + (high - low) * self.random(n)

    def integers(self, low: int, high: int, n: int) -> np.ndarray:
        """Integers in [low, high), like Generator.integers."""
        return low + np.minimum((self.random(n) * (high - low)).astype(np.int64), high - low - 1)


def row_rng(seed: Sequence[int], idx: np.ndarray) -> RowRandom:
    """Per-row randomness for rows `idx` (their `idx` column) under `seed` (run seed, epoch)."""
    with np.errstate(over="ignore"):
        k = np.zeros(1, np.uint64)
        for s in seed:
            k = _mix64((k ^ np.uint64(int(s) & _MASK)) + _GOLDEN)
        return RowRandom(_mix64((k ^ np.asarray(idx).astype(np.uint64)) + _GOLDEN))


def augment_batch(batch: dict, *, views: int, aug, mean: Sequence[float], std: Sequence[float],
                  seed: Sequence[int]) -> dict:
    """{image uint8 N x H x W x C, idx, ...} -> {weak, view0.., float32 normalised NCHW, ...}.

    `seed` is (run seed, epoch): each row's augmentation is a function of it and the row's idx only.
    Other columns (weight, tgt_idx, tgt_prob, label) pass through; image and idx are dropped.
    """
    image = np.asarray(batch["image"])
    idx = np.asarray(batch["idx"])
    rng = row_rng(seed, idx)
    if not image.flags.writeable:  # Ray Data hands read-only views of its blocks; torch wants writable memory
        image = image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float()
    out = {k: v for k, v in batch.items() if k not in ("image", "idx", "key") and not k.startswith("tc_")}
    if "tc_params" in batch:  # cached teacher outputs: one of the K stored weak views, rebuilt exactly
        pick = cached_view(batch, seed, idx)
        out["weak"] = normalise(weak_from_params(x, pick.pop("params")), mean, std).numpy()
        out.update(pick)
    else:
        out["weak"] = normalise(weak_view(x, rng, aug.weak_pad, aug.flip), mean, std).numpy()
    for v in range(views):
        out[f"view{v}"] = normalise(strong_view(x, rng, aug), mean, std).numpy()
    return out


def cached_view(batch: dict, seed: Sequence[int], idx: np.ndarray) -> dict:
    """Each row's stored view for this epoch (a function of (seed, epoch, row idx) only) and its teacher outputs:
    {params (n, 3), t_idx (n, k) int64, t_val (n, k) float32 logits, t_feat (n, d) float32}."""
    params = np.asarray(batch["tc_params"])  # (n, K, 3)
    n, k_views = params.shape[:2]
    h = row_rng((*seed, _VIEW_TAG), idx).integers(0, k_views, n)
    rows = np.arange(n)
    return {"params": params[rows, h], "t_idx": np.asarray(batch["tc_idx"])[rows, h].astype(np.int64),
            "t_val": np.asarray(batch["tc_val"])[rows, h].astype(np.float32),
            "t_feat": np.asarray(batch["tc_feat"])[rows, h].astype(np.float32)}
