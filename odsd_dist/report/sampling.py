"""`odsd report sampling`: one self-contained HTML page (PNG plots embedded as base64) about a selection.

Plots: teacher-class histogram of the selected set (and of comparison selections); score
distributions of selected vs rejected pool rows (maxprob, entropy, energy, cosine to the selected
set's class prototype); a 2-D t-SNE map (PCA + exact t-SNE in torch, on a bounded random subsample)
of teacher features for selected, rejected and, when given, a reference sample of original-domain
images scored by the teacher itself; with a provenance table (reports only, never a pipeline
input): near-neighbour precision by teacher class for every selection, and shares by source.

The pool is streamed file by file (memory ~ one batch + the bounded subsample), never loaded whole.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError

# Tiny ImageNet classes (wnid: the provenance's `source_class` words) that are near neighbours of a CIFAR-10
# class: the images a CIFAR-10 teacher may rightly call that class. Judged by eye, fixed here so every run
# uses the same map. Tiny ImageNet has no airplane (left out of the overall figure) and no horse (hoofed
# stand-ins); a police van is a neighbour of both automobile and truck.
TINYIMAGENET_NEAR_CIFAR10 = {
    "n04285008": ("sports car", ("automobile",)),
    "n03100240": ("convertible", ("automobile",)),
    "n03670208": ("limousine", ("automobile",)),
    "n02814533": ("beach wagon", ("automobile",)),
    "n03444034": ("go-kart", ("automobile",)),
    "n03977966": ("police van", ("automobile", "truck")),
    "n02058221": ("albatross", ("bird",)),
    "n02002724": ("black stork", ("bird",)),
    "n01855672": ("goose", ("bird",)),
    "n02056570": ("king penguin", ("bird",)),
    "n02124075": ("Egyptian cat", ("cat",)),
    "n02123045": ("tabby", ("cat",)),
    "n02123394": ("Persian cat", ("cat",)),
    "n02423022": ("gazelle", ("deer",)),
    "n02415577": ("bighorn", ("deer",)),
    "n02085620": ("Chihuahua", ("dog",)),
    "n02106662": ("German shepherd", ("dog",)),
    "n02099712": ("Labrador retriever", ("dog",)),
    "n02094433": ("Yorkshire terrier", ("dog",)),
    "n02099601": ("golden retriever", ("dog",)),
    "n02113799": ("standard poodle", ("dog",)),
    "n01641577": ("bullfrog", ("frog",)),
    "n01644900": ("tailed frog", ("frog",)),
    "n01629819": ("European fire salamander", ("frog",)),
    "n02437312": ("Arabian camel", ("horse",)),
    "n02403003": ("ox", ("horse",)),
    "n02410509": ("bison", ("horse",)),
    "n03662601": ("lifeboat", ("ship",)),
    "n03447447": ("gondola", ("ship",)),
    "n03796401": ("moving van", ("truck",)),
    "n04146614": ("school bus", ("truck",)),
    "n04487081": ("trolleybus", ("truck",)),
    "n04465501": ("tractor", ("truck",)),
    "n03393912": ("freight car", ("truck",)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _is_wnid(x: str) -> bool:
    return len(x) == 9 and x[0] == "n" and x[1:].isdigit()


def _invert(near: dict, classes) -> dict:
    """{wnid: (words, teacher classes)} -> {teacher class: [words and wnids of its near neighbours]}."""
    out = {c: [] for c in classes}
    for wnid, (words, targets) in near.items():
        for c in targets:
            out[c] += [words, wnid]
    return out


CIFAR10_TINYIMAGENET = _invert(TINYIMAGENET_NEAR_CIFAR10, CIFAR10_CLASSES)
BUILTIN_MAPS = {"cifar10-tinyimagenet": CIFAR10_TINYIMAGENET}

SEL_COLOUR, REJ_COLOUR, REF_COLOUR = "#1f77b4", "#bbbbbb", "#d62728"


# ------------------------------------------------------------------------------------------ inputs


def load_class_map(spec: Optional[str], class_names: Sequence[str]) -> Optional[dict]:
    """A {teacher class name: [near-neighbour source classes]} map from a JSON/YAML file or a built-in name."""
    if spec is None:
        return CIFAR10_TINYIMAGENET if tuple(class_names) == CIFAR10_CLASSES else None
    if spec in BUILTIN_MAPS:
        unknown = [k for k in BUILTIN_MAPS[spec] if k not in class_names]
        if unknown:
            raise UserError(f"--class-map {spec}: the teacher has no classes {unknown[:5]}")
        return BUILTIN_MAPS[spec]
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"--class-map: no such file or built-in map: {spec} (built-in: {', '.join(BUILTIN_MAPS)})")
    import yaml

    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise UserError(f"--class-map {p}: not valid JSON/YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"--class-map {p}: expected a mapping of class name -> list of source class names")
    unknown = [k for k in data if k not in class_names]
    if unknown:
        raise UserError(f"--class-map {p}: unknown teacher classes {unknown[:5]}")
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def _selection_path(p: str) -> Path:
    path = Path(p)
    if path.is_dir():
        path = path / "selection.parquet"
    if not path.is_file():
        raise UserError(f"selection not found: {p}")
    return path


def _read_selection(path: Path) -> tuple[pa.Table, dict]:
    from ..tables import read_meta

    try:
        t = pq.read_table(path, columns=["key", "pred", "score", "weight"])
    except Exception as e:
        raise UserError(f"selection {path}: not a selection table ({e.__class__.__name__}: {e})") from None
    return t, read_meta(path)


# ------------------------------------------------------------------------------------------ pool scan


def _cosine_hist_setup(sel_sum: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(sel_sum, axis=1, keepdims=True)
    return np.where(norm > 0, sel_sum / np.where(norm > 0, norm, 1), 0).astype(np.float32)


def scan_pool(files: list[str], selected: pa.Array, d: int, c: int, max_points: int, seed: int,
              batch_rows: int = 65_536) -> dict:
    """Two streaming passes: (1) ranges, selected-set prototypes, the map subsample; (2) histograms."""
    from ..sample.columns import features_np
    from ..sample.keyhash import key_uniform

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    n_sel = len(selected)
    m_sel, m_rej = max_points // 2, max_points - max_points // 2
    p_sel = min(1.0, 1.5 * m_sel / max(n_sel, 1))
    p_rej = min(1.0, 1.5 * m_rej / max(total - n_sel, 1))
    cols = ["key", "pred", "maxprob", "entropy", "energy", "feature"]
    sel_sum = np.zeros((c, d))
    e_lo, e_hi = np.inf, -np.inf
    pts = {"u": [], "f": [], "pred": [], "sel": []}
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=cols):
            t = pa.Table.from_batches([b])
            mask = pc.is_in(t.column("key"), value_set=selected).to_numpy(zero_copy_only=False)
            pred = t.column("pred").to_numpy()
            feat = features_np(t, d)
            en = t.column("energy").to_numpy()
            e_lo, e_hi = min(e_lo, float(en.min())), max(e_hi, float(en.max()))
            if mask.any():
                np.add.at(sel_sum, pred[mask], feat[mask])
            u = key_uniform(t.column("key"), seed)
            take = np.where(mask, u < p_sel, u < p_rej)
            if take.any():
                pts["u"].append(u[take]); pts["f"].append(feat[take]); pts["pred"].append(pred[take]); pts["sel"].append(mask[take])
    protos = _cosine_hist_setup(sel_sum)
    bins = {"maxprob": np.linspace(0, 1, 41), "entropy": np.linspace(0, 1, 41),
            "energy": np.linspace(e_lo, e_hi if e_hi > e_lo else e_lo + 1, 41), "cosine": np.linspace(-1, 1, 41)}
    hist = {k: {"sel": np.zeros(40, np.int64), "rej": np.zeros(40, np.int64)} for k in bins}
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=cols):
            t = pa.Table.from_batches([b])
            mask = pc.is_in(t.column("key"), value_set=selected).to_numpy(zero_copy_only=False)
            pred = t.column("pred").to_numpy()
            vals = {k: t.column(k).to_numpy() for k in ("maxprob", "entropy", "energy")}
            vals["cosine"] = (features_np(t, d) * protos[pred]).sum(1)
            for k, v in vals.items():
                hist[k]["sel"] += np.histogram(v[mask], bins[k])[0]
                hist[k]["rej"] += np.histogram(v[~mask], bins[k])[0]
    sample = {k: np.concatenate(v) if v else np.zeros(0) for k, v in pts.items()}
    keep = []
    for flag, m in ((True, m_sel), (False, m_rej)):  # trim to the budget: smallest hash first
        idx = np.nonzero(sample["sel"] == flag)[0] if len(sample["sel"]) else np.zeros(0, int)
        keep.append(idx[np.argsort(sample["u"][idx], kind="stable")[:m]])
    keep = np.sort(np.concatenate(keep)).astype(int)
    return {"total": total, "bins": bins, "hist": hist, "protos": protos,
            "points": {k: v[keep] for k, v in sample.items() if k != "u"}}


# ------------------------------------------------------------------------------------------ reference


def score_reference(paths: list[str], teacher: str, n: int, score_meta: dict, seed: int) -> dict:
    """Teacher features of up to n labelled original-domain images, projected like the score table."""
    import torch

    from ..models import load_model, normalize
    from ..score.scorer import projection_matrix, score_logits_features
    from ..shards.labelled import load_labelled

    model, meta = load_model(teacher)
    model.eval()
    size = int(meta.get("input_size", 32))
    x, y, _ = load_labelled(paths, size, int(meta.get("in_chans", 3)), progress=False)
    if len(x) == 0:
        raise UserError(f"--reference: no labelled images in {paths}")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False))
    proj = None
    pm = score_meta.get("projection")
    if pm:
        proj = projection_matrix(int(pm["in_dim"]), int(pm["out_dim"]), int(pm["seed"]))
    topk = min(int(score_meta.get("num_classes", 10)), 10)
    out_f, out_p = [], []
    with torch.no_grad():
        for s in range(0, len(idx), 256):
            xb = normalize(x[idx[s: s + 256]], meta)
            f = model.forward_features(xb)
            logits = model.classify(f)
            cols = score_logits_features(logits, f, topk, proj)
            out_f.append(cols["feature"].astype(np.float32)); out_p.append(cols["pred"])
    f = np.concatenate(out_f)
    if f.shape[1] != int(score_meta.get("feature_dim", f.shape[1])):
        raise UserError(f"--reference: teacher features have {f.shape[1]} dims, the score table {score_meta.get('feature_dim')}")
    pred = np.concatenate(out_p)
    return {"f": f, "pred": pred, "label": np.asarray(y)[idx], "accuracy": float((pred == np.asarray(y)[idx]).mean())}


# ------------------------------------------------------------------------------------------ t-SNE


def tsne(x: np.ndarray, perplexity: float = 30.0, iters: int = 400, seed: int = 0, pca_dims: int = 30) -> np.ndarray:
    """t-SNE (van der Maaten & Hinton 2008) after PCA, in torch float32, for a few thousand points.

    Input affinities over each point's 3*perplexity nearest neighbours (as Barnes-Hut t-SNE does), exact
    O(n^2) gradient with in-place arithmetic; deterministic given the seed.
    """
    import torch

    n = len(x)
    if n < 5:
        return np.zeros((n, 2), np.float32)
    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    X = X - X.mean(0)
    if X.shape[1] > pca_dims:
        _, _, v = torch.linalg.svd(X, full_matrices=False)
        X = X @ v[:pca_dims].T
    perplexity = min(perplexity, (n - 1) / 3)
    k = min(n - 1, int(3 * perplexity) + 1)
    D = torch.cdist(X, X).pow_(2)
    D.fill_diagonal_(float("inf"))
    dk, ik = D.topk(k, dim=1, largest=False)  # squared distances to the k nearest neighbours
    del D
    dk = dk - dk[:, :1]  # shift per row: the same conditional P, no underflow
    target = float(np.log(perplexity))
    lo = torch.full((n, 1), -20.0)
    hi = torch.full((n, 1), 20.0)
    for _ in range(50):  # bisection on log(beta) for every row at once
        lb = (lo + hi) / 2
        Pk = torch.exp(-dk * lb.exp())
        sk = Pk.sum(1, keepdim=True).clamp_min(1e-12)
        H = torch.log(sk) + lb.exp() * (dk * Pk).sum(1, keepdim=True) / sk
        hi = torch.where(H < target, lb, hi)
        lo = torch.where(H < target, lo, lb)
    P = torch.zeros(n, n)
    P.scatter_(1, ik, Pk / sk)
    P = P + P.T
    P /= P.sum()
    P_early = P * 12.0  # early exaggeration for the first 100 iterations
    Y = torch.randn(n, 2, generator=g) * 1e-4
    vel = torch.zeros_like(Y)
    gains = torch.ones_like(Y)
    lr = max(n / 12.0 / 4.0, 50.0)
    for it in range(iters):
        sq = (Y * Y).sum(1)
        num = torch.addmm(sq[:, None] + sq[None, :], Y, Y.T, alpha=-2.0)  # |y_i - y_j|^2
        num.clamp_min_(0).add_(1.0).reciprocal_()
        num.fill_diagonal_(0.0)
        z = float(num.sum())
        W = (P_early if it < 100 else P) * num
        W.addcmul_(num, num, value=-1.0 / z)  # (p_ij - q_ij) * num_ij
        grad = 4.0 * (W.sum(1, keepdim=True) * Y - W @ Y)
        mom = 0.5 if it < 250 else 0.8
        gains = torch.where(torch.sign(grad) != torch.sign(vel), gains + 0.2, gains * 0.8).clamp_min(0.01)
        vel = mom * vel - lr * gains * grad
        Y = Y + vel
        Y = Y - Y.mean(0)
    return Y.numpy()


# ------------------------------------------------------------------------------------------ plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_class_histogram(names, selections: dict[str, np.ndarray], n: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    k = len(selections)
    width = 0.8 / max(k, 1)
    x = np.arange(len(names))
    for i, (label, counts) in enumerate(selections.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, counts, width, label=label)
    if n:
        ax.axhline(n / len(names), color="k", ls="--", lw=1, label="N / C")
        ax.axhspan(0.8 * n / len(names), 1.2 * n / len(names), color="k", alpha=0.06, label="+/-20%")
    ax.set_xticks(x, names, rotation=30 if len(names) > 12 else 0, fontsize=8 if len(names) > 20 else 10)
    ax.set_ylabel("selected images")
    ax.set_title("Selected images per teacher class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_score_distributions(scan: dict):
    import matplotlib.pyplot as plt

    titles = {"maxprob": "confidence (maxprob)", "entropy": "normalised entropy", "energy": "energy (lower = in-domain)",
              "cosine": "cosine to the selected set's class prototype"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, titles):
        b = scan["bins"][key]
        centres = (b[:-1] + b[1:]) / 2
        for part, colour, label in (("rej", REJ_COLOUR, "rejected"), ("sel", SEL_COLOUR, "selected")):
            h = scan["hist"][key][part].astype(float)
            if h.sum():
                ax.fill_between(centres, h / h.sum(), step="mid", alpha=0.55, color=colour, label=label)
        ax.set_title(titles[key], fontsize=10)
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    fig.suptitle("Score distributions: selected vs rejected (share of each set per bin)")
    return fig


def plot_map(xy: np.ndarray, group: np.ndarray, pred: np.ndarray, names):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    ax = axes[0]
    for g, colour, label, size in ((1, REJ_COLOUR, "rejected", 6), (0, SEL_COLOUR, "selected", 6), (2, REF_COLOUR, "reference (original domain)", 10)):
        m = group == g
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, c=colour, label=f"{label} ({m.sum()})", alpha=0.7, linewidths=0)
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("t-SNE of teacher features")
    ax = axes[1]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    m = group != 1
    for k in range(len(names)):
        mk = m & (pred == k)
        if mk.any():
            ax.scatter(xy[mk, 0], xy[mk, 1], s=np.where(group[mk] == 2, 14, 6), color=cmap(k % cmap.N),
                       label=names[k] if len(names) <= 20 else None, alpha=0.8, linewidths=0)
    ax.set_title("selected (dots) and reference (larger) by teacher class")
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, ncol=2)
    for a in axes:
        a.set_xticks([]); a.set_yticks([])
    return fig


def plot_precision(names, precision: dict[str, dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    k = len(precision)
    width = 0.8 / max(k, 1)
    x = np.arange(len(names) + 1)
    for i, (label, pr) in enumerate(precision.items()):
        vals = [pr["per_class"].get(n, np.nan) for n in names] + [pr["overall"]]
        ax.bar(x + (i - (k - 1) / 2) * width, np.nan_to_num(vals), width, label=f"{label} (overall {pr['overall']:.1%})")
    ax.set_xticks(x, list(names) + ["overall"], rotation=30 if len(names) > 12 else 0)
    ax.set_ylabel("share of selected images")
    ax.set_ylim(0, 1)
    ax.set_title("Near-neighbour precision: selected images whose source class is a near neighbour of the teacher's class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ------------------------------------------------------------------------------------------ provenance


def near_neighbour_precision(sel: pa.Table, prov: pa.Table, names, class_map: dict) -> dict:
    """Share of selected rows whose provenance source_class is in class_map[teacher class].

    Only rows the provenance can judge count: a selected key missing from the provenance or with no
    source_class (e.g. Tiny ImageNet's unlabelled test split) is reported as unjudged, and classes
    with an empty neighbour list are left out of the overall figure."""
    j = sel.select(["key", "pred"]).join(prov.select(["key", "source", "source_class"]), "key")
    pred = j.column("pred").to_numpy().astype(np.int64)
    src = np.array(j.column("source_class").to_pylist(), dtype=object)
    known = np.array([s is not None for s in src], dtype=bool)
    neighbours = [set(class_map.get(n, ())) for n in names]
    hit = np.array([s in neighbours[p] for p, s in zip(pred, src)], dtype=bool)
    per_class, tot_hit, tot = {}, 0, 0
    for k, name in enumerate(names):
        if not neighbours[k]:
            continue
        m = (pred == k) & known
        if m.any():
            per_class[name] = float(hit[m].mean())
            tot_hit += int(hit[m].sum()); tot += int(m.sum())
    by_source = {}
    for s, cnt in zip(*np.unique(np.array(j.column("source").to_pylist(), dtype=object).astype(str), return_counts=True)):
        by_source[s] = int(cnt)
    top = {}
    for k, name in enumerate(names):
        m = (pred == k) & known
        if m.any():
            u, cnt = np.unique(src[m].astype(str), return_counts=True)
            o = np.argsort(-cnt, kind="stable")[:5]
            top[name] = [(str(u[i]), int(cnt[i])) for i in o]
    return {"per_class": per_class, "overall": tot_hit / tot if tot else float("nan"), "matched": j.num_rows,
            "unjudged": int(sel.num_rows - known.sum()), "by_source": by_source, "top_sources": top,
            "hits": tot_hit, "counted": tot}


# ------------------------------------------------------------------------------------------ page


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1300px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} td.l, th.l {{ text-align: left; }}
img.plot {{ max-width: 100%; display: block; margin: 8px 0; }} .note {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>{title}</h1>
{body}
<script>
window.addEventListener('load', function () {{
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (im) {{
    im.setAttribute('data-natural-width', im.naturalWidth);
    im.setAttribute('data-natural-height', im.naturalHeight);
    if (im.naturalWidth > 0 && im.naturalHeight > 0) ok++;
  }});
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
}});
</script>
</body></html>
"""


def _img(b64: str, alt: str, pid: str) -> str:
    return f'<img class="plot" id="{pid}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(header, rows, left=1) -> str:
    h = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(x))}</th>' for i, x in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(x))}</td>' for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def build_report(selection: str, out: str, scores: Optional[str] = None, provenance: Optional[str] = None,
                 class_map: Optional[str] = None, compare: Sequence[str] = (), reference: Sequence[str] = (),
                 teacher: Optional[str] = None, reference_n: int = 300, max_points: int = 2000,
                 tsne_iters: int = 400, seed: int = 0) -> dict:
    """Write the HTML page; returns a summary dict (figures, precision, path)."""
    from ..sample.inputs import open_scores

    t0 = time.perf_counter()
    sel_path = _selection_path(selection)
    sel, meta = _read_selection(sel_path)
    score_dir = Path(scores or meta.get("scores") or "")
    inp = open_scores(score_dir)
    names = inp.class_names
    c, d = inp.num_classes, inp.feature_dim
    cmap = load_class_map(class_map, names)
    prov = None
    if provenance:
        if not Path(provenance).is_file():
            raise UserError(f"--provenance: not found: {provenance}")
        try:
            prov = pq.read_table(provenance, columns=["key", "source", "source_class"])
        except Exception as e:  # not Parquet, or lacking a column
            raise UserError(f"--provenance {provenance}: not a provenance table with key, source, source_class "
                            f"({e.__class__.__name__}: {e})") from None
    if prov is not None and cmap is None:
        raise UserError(f"--provenance: no built-in class map for the teacher classes {names[:4]}...: "
                        "pass --class-map FILE ({teacher class: [near-neighbour source classes]})")
    others = {}
    for p in compare:
        cp = _selection_path(p)
        t, m = _read_selection(cp)
        others[f"{m.get('method', '?')} ({cp.parent.name})"] = t
    label = f"{meta.get('method', '?')} ({sel_path.parent.name})"
    notes, plots, summary = [], [], {"selection": str(sel_path), "method": meta.get("method")}

    counts = {label: np.bincount(sel.column("pred").to_numpy(), minlength=c)[:c]}
    for k, t in others.items():
        counts[k] = np.bincount(t.column("pred").to_numpy(), minlength=c)[:c]
    n = int(meta.get("config", {}).get("n") or sel.num_rows)
    plots.append(("Teacher classes of the selected set",
                  _img(_png(plot_class_histogram(names, counts, n if meta.get("method") != "all" else 0)), "class histogram", "plot-classes")))
    scan = scan_pool(inp.files, sel.column("key").combine_chunks(), d, c, max_points, seed)
    plots.append(("Scores of selected vs rejected pool images", _img(_png(plot_score_distributions(scan)), "score distributions", "plot-scores")))

    pts = scan["points"]
    feats, group, pred = [pts["f"]], [np.where(pts["sel"], 0, 1)], [pts["pred"]]
    ref_info = None
    if reference:
        try:
            w = teacher
            if not w:
                raise UserError("--reference needs --teacher (the teacher's safetensors file)")
            ref_info = score_reference(list(reference), w, reference_n, inp.meta, seed)
            feats.append(ref_info["f"]); group.append(np.full(len(ref_info["f"]), 2)); pred.append(ref_info["pred"])
            notes.append(f"Reference: {len(ref_info['f'])} original-domain images scored by the teacher "
                         f"(teacher accuracy on them {ref_info['accuracy']:.1%}).")
        except UserError:
            raise
        except Exception as e:  # the reference is an extra: say why it is missing, keep the page
            notes.append(f"Reference sample not shown: {e.__class__.__name__}: {e}")
    X = np.concatenate(feats).astype(np.float32)
    xy = tsne(X, iters=tsne_iters, seed=seed)
    plots.append(("2-D map of teacher features (PCA + t-SNE)",
                  _img(_png(plot_map(xy, np.concatenate(group), np.concatenate(pred), names)), "t-SNE map", "plot-map")))

    prec_html = ""
    if prov is not None and cmap is not None:
        precision = {label: near_neighbour_precision(sel, prov, names, cmap)}
        for k, t in others.items():
            precision[k] = near_neighbour_precision(t, prov, names, cmap)
        plots.append(("Precision by source (provenance)", _img(_png(plot_precision(names, precision)), "precision", "plot-precision")))
        rows = [[k, f"{v['overall']:.1%}", f"{v['hits']:,} / {v['counted']:,}", f"{v['unjudged']:,}",
                 ", ".join(f"{s}: {cnt:,}" for s, cnt in v["by_source"].items())] for k, v in precision.items()]
        top = precision[label]["top_sources"]
        prec_html = ("<h2>Near-neighbour precision</h2>" + _table(["selection", "precision", "hits / counted", "unjudged (no source class)", "selected by source"], rows)
                     + "<p class='note'>Class map (teacher class &rarr; near-neighbour source classes):</p>"
                     + _table(["teacher class", "near neighbours"], [[k, ", ".join(x for x in v if not _is_wnid(x)) or "(none: left out)"] for k, v in cmap.items()])
                     + f"<h2>Most selected source classes per teacher class ({html.escape(label)})</h2>"
                     + _table(["teacher class", "top source classes (count)"], [[k, ", ".join(f"{s} ({n_})" for s, n_ in v)] for k, v in top.items()]))
        summary["precision"] = {k: {x: v[x] for x in ("overall", "per_class", "hits", "counted", "unjudged")}
                                for k, v in precision.items()}

    cfg_json = html.escape(json.dumps(meta.get("config", {}), indent=1, sort_keys=True))
    head = _table(["", "value"], [["selection", str(sel_path)], ["method", meta.get("method")],
                                  ["selected", f"{sel.num_rows:,}"], ["pool rows", f"{scan['total']:,}"],
                                  ["teacher sha256", str(meta.get("teacher_sha256"))[:16]],
                                  ["targets", json.dumps(meta.get("targets"))]])
    per_class = _table(["class"] + list(counts), [[nm] + [f"{int(cnt[i]):,}" for cnt in counts.values()] for i, nm in enumerate(names)])
    body = [head] + [f"<p class='note'>{html.escape(x)}</p>" for x in notes]
    for title, img in plots:
        body.append(f"<h2>{html.escape(title)}</h2>{img}")
        if title.startswith("Teacher classes"):
            body.append(per_class)
    body.append(prec_html)
    body.append(f"<h2>Selection config</h2><pre style='font-size:12px'>{cfg_json}</pre>")
    out_path = Path(out)
    from ..tables import atomic_write_bytes

    atomic_write_bytes(out_path, PAGE.format(title=html.escape(f"Sampling report: {label}"), body="\n".join(body)).encode())
    summary.update(out=str(out_path), plots=len(plots), seconds=round(time.perf_counter() - t0, 2),
                   map_points=int(len(X)), reference=None if ref_info is None else len(ref_info["f"]))
    return summary


REPORT_EPILOG = """The page (one HTML file, plots embedded) shows: selected images per teacher class; score
distributions of selected vs rejected pool images; a t-SNE map of teacher features (selected,
rejected and, with --reference, original-domain images); with --provenance, the share of selected
images whose source class is a near neighbour of the teacher's class (built-in map for a CIFAR-10
teacher on the Tiny ImageNet pool: cifar10-tinyimagenet), printed for every selection.

example: APS vs maxprob on the 120k pool, judged with the provenance table
  odsd report sampling --selection runs/cifar10/sample-aps --compare runs/cifar10/sample-maxprob \\
      --provenance ../shared/data/openworld_provenance.parquet \\
      --reference ../shared/data/cifar10/test --teacher runs/cifar10/teacher.safetensors
"""


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.epilog = REPORT_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", "-c", help="YAML config: default selection/scores/teacher paths come from it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--selection", help="selection.parquet or a sample dir (default: the config's sample dir)")
    p.add_argument("--scores", help="score dir (default: the one recorded in the selection metadata)")
    p.add_argument("--compare", action="append", default=[], metavar="SELECTION",
                   help="another selection to compare (class histogram, precision), e.g. a maxprob run; repeatable")
    p.add_argument("--provenance", help="provenance table (key, source, source_class, ...): reports only")
    p.add_argument("--class-map", help="JSON/YAML {teacher class: [near-neighbour source classes]} or "
                                       f"a built-in map ({', '.join(BUILTIN_MAPS)}); default: built-in for CIFAR-10 names")
    p.add_argument("--reference", action="append", default=[], metavar="SHARDS",
                   help="labelled original-domain shards (tar, folder or glob) for the map; repeatable")
    p.add_argument("--teacher", help="teacher safetensors for the reference (default: teacher.weights of the config)")
    p.add_argument("--reference-n", type=int, default=300, help="reference images to score (default 300)")
    p.add_argument("--max-points", type=int, default=2000, help="pool points in the map, half selected, half rejected (default 2000)")
    p.add_argument("--tsne-iters", type=int, default=400, help="t-SNE iterations (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the map subsample and t-SNE (default 0)")
    p.add_argument("--out", "-o", help="HTML file (default: <selection dir>/report.html)")


def report_cli(args) -> dict:
    selection, teacher = args.selection, args.teacher
    if selection is None or (args.reference and teacher is None):
        from ..config import load_config

        cfg = load_config(args.config, args.overrides)
        selection = selection or str(cfg.stage_dir("sample"))
        teacher = teacher or cfg.teacher.weights
    if args.max_points < 10 or args.reference_n < 1:
        raise UserError("--max-points must be >= 10 and --reference-n >= 1")
    sel_path = _selection_path(selection)
    out = args.out or str(sel_path.parent / "report.html")
    s = build_report(str(sel_path), out, scores=args.scores, provenance=args.provenance, class_map=args.class_map,
                     compare=args.compare, reference=args.reference, teacher=teacher, reference_n=args.reference_n,
                     max_points=args.max_points, tsne_iters=args.tsne_iters, seed=args.seed)
    print(f"odsd report sampling: wrote {s['out']} ({s['plots']} plots, {s['map_points']} map points, {s['seconds']} s)")
    prec = s.get("precision") or {}
    for k, v in prec.items():
        print(f"  near-neighbour precision {k}: {v['overall']:.1%} ({v['hits']:,} of {v['counted']:,} judged "
              f"selected images; {v['unjudged']:,} without a source class)")
    first = next(iter(prec), None)
    for k in list(prec)[1:]:
        print(f"  {first} minus {k}: {100 * (prec[first]['overall'] - prec[k]['overall']):+.1f} points")
    return s
