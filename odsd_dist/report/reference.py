"""A reference sample for the map: labelled original-domain images scored by the teacher itself, with the
score stage's own function and the score table's projection, so they land in the same feature space."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..models import load_model
from ..score.scorer import projection_from_meta, score_images
from ..shards.labelled import load_labelled


def score_reference(paths: list[str], teacher: str, n: int, score_meta: dict, seed: int) -> dict:
    """Teacher features of up to n labelled original-domain images, projected like the score table."""
    model, meta = load_model(teacher)
    model.eval()
    size = int(meta.get("input_size", 32))
    x, y, _ = load_labelled(paths, size, int(meta.get("in_chans", 3)), progress=False)
    if len(x) == 0:
        raise UserError(f"--reference: no labelled images in {paths}")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False))
    topk = min(int(score_meta.get("num_classes", 10)), 10)
    cols = score_images(model, meta, x[idx], topk, projection_from_meta(score_meta))
    f = cols["feature"].astype(np.float32)
    if f.shape[1] != int(score_meta.get("feature_dim", f.shape[1])):
        raise UserError(f"--reference: teacher features have {f.shape[1]} dims, the score table {score_meta.get('feature_dim')}")
    pred = cols["pred"]
    return {"f": f, "pred": pred, "label": np.asarray(y)[idx], "accuracy": float((pred == np.asarray(y)[idx]).mean())}
