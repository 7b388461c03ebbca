"""`odsd report sampling`: one self-contained HTML page (PNG plots embedded as base64) about a selection.

Plots: teacher-class histogram of the selected set (and of comparison selections); score
distributions of selected vs rejected pool rows (maxprob, entropy, energy, cosine to the selected
set's class prototype); a 2-D t-SNE map (PCA + exact t-SNE in torch, on a bounded random subsample)
of teacher features for selected, rejected and, when given, a reference sample of original-domain
images scored by the teacher itself; with a provenance table (reports only, never a pipeline
input): near-neighbour precision by teacher class for every selection, and shares by source.

The pool is streamed file by file (memory ~ one batch + the bounded subsample), never loaded whole.
This module puts the page together; its parts: inputs.py (selections, provenance), classmap.py,
scan.py (the pool scan), reference.py (teacher re-scoring), embed.py (t-SNE), plots.py,
precision.py, page.py (HTML); cli.py is `odsd report sampling`'s arguments.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..sample.inputs import open_scores
from .classmap import is_wnid, load_class_map
from .embed import tsne
from .inputs import read_provenance, read_selection, selection_path
from .page import img, table, write_page
from .plots import plot_class_histogram, plot_map, plot_precision, plot_score_distributions, png_b64
from .precision import near_neighbour_precision
from .reference import score_reference
from .scan import scan_pool


def build_report(selection: str, out: str, scores: Optional[str] = None, provenance: Optional[str] = None,
                 class_map: Optional[str] = None, compare: Sequence[str] = (), reference: Sequence[str] = (),
                 teacher: Optional[str] = None, reference_n: int = 300, max_points: int = 2000,
                 tsne_iters: int = 400, seed: int = 0) -> dict:
    """Write the HTML page; returns a summary dict (figures, precision, path)."""
    t0 = time.perf_counter()
    sel_path = selection_path(selection)
    sel, meta = read_selection(sel_path)
    inp = open_scores(Path(scores or meta.get("scores") or ""))
    names = inp.class_names
    c, d = inp.num_classes, inp.feature_dim
    cmap = load_class_map(class_map, names)
    prov = read_provenance(provenance) if provenance else None
    if prov is not None and cmap is None:
        raise UserError(f"--provenance: no built-in class map for the teacher classes {names[:4]}...: "
                        "pass --class-map FILE ({teacher class: [near-neighbour source classes]})")
    others = {}
    for p in compare:
        cp = selection_path(p)
        t, m = read_selection(cp)
        others[f"{m.get('method', '?')} ({cp.parent.name})"] = t
    label = f"{meta.get('method', '?')} ({sel_path.parent.name})"
    notes, plots, summary = [], [], {"selection": str(sel_path), "method": meta.get("method")}

    counts = {label: np.bincount(sel.column("pred").to_numpy(), minlength=c)[:c]}
    for k, t in others.items():
        counts[k] = np.bincount(t.column("pred").to_numpy(), minlength=c)[:c]
    n = int(meta.get("config", {}).get("n") or sel.num_rows)
    plots.append(("Teacher classes of the selected set",
                  img(png_b64(plot_class_histogram(names, counts, n if meta.get("method") != "all" else 0)), "class histogram", "plot-classes")))
    scan = scan_pool(inp.files, sel.column("key").combine_chunks(), d, c, max_points, seed)
    plots.append(("Scores of selected vs rejected pool images", img(png_b64(plot_score_distributions(scan)), "score distributions", "plot-scores")))
    map_html, map_points, ref_info = _feature_map(scan["points"], names, reference, teacher, reference_n, inp.meta,
                                                  seed, tsne_iters, notes)
    plots.append(("2-D map of teacher features (PCA + t-SNE)", map_html))

    prec_html = ""
    if prov is not None and cmap is not None:
        precision = {label: near_neighbour_precision(sel, prov, names, cmap)}
        for k, t in others.items():
            precision[k] = near_neighbour_precision(t, prov, names, cmap)
        plots.append(("Precision by source (provenance)", img(png_b64(plot_precision(names, precision)), "precision", "plot-precision")))
        prec_html = _precision_html(precision, label, cmap)
        summary["precision"] = {k: {x: v[x] for x in ("overall", "per_class", "hits", "counted", "unjudged")}
                                for k, v in precision.items()}

    out_path = Path(out)
    write_page(out_path, f"Sampling report: {label}", _body(sel_path, sel, meta, scan, names, counts, notes, plots, prec_html))
    summary.update(out=str(out_path), plots=len(plots), seconds=round(time.perf_counter() - t0, 2),
                   map_points=map_points, reference=None if ref_info is None else len(ref_info["f"]))
    return summary


def _feature_map(pts: dict, names, reference: Sequence[str], teacher: Optional[str], reference_n: int,
                 score_meta: dict, seed: int, tsne_iters: int, notes: list[str]) -> tuple[str, int, Optional[dict]]:
    """(the map's <img>, its number of points, the reference's scores or None): the pool subsample and,
    when asked, the teacher-scored reference images, embedded together."""
    feats, group, pred = [pts["f"]], [np.where(pts["sel"], 0, 1)], [pts["pred"]]
    ref_info = None
    if reference:
        try:
            w = teacher
            if not w:
                raise UserError("--reference needs --teacher (the teacher's safetensors file)")
            ref_info = score_reference(list(reference), w, reference_n, score_meta, seed)
            feats.append(ref_info["f"]); group.append(np.full(len(ref_info["f"]), 2)); pred.append(ref_info["pred"])
            notes.append(f"Reference: {len(ref_info['f'])} original-domain images scored by the teacher "
                         f"(teacher accuracy on them {ref_info['accuracy']:.1%}).")
        except UserError:
            raise
        except Exception as e:  # the reference is an extra: say why it is missing, keep the page
            notes.append(f"Reference sample not shown: {e.__class__.__name__}: {e}")
    X = np.concatenate(feats).astype(np.float32)
    xy = tsne(X, iters=tsne_iters, seed=seed)
    fig = plot_map(xy, np.concatenate(group), np.concatenate(pred), names)
    return img(png_b64(fig), "t-SNE map", "plot-map"), int(len(X)), ref_info


def _precision_html(precision: dict, label: str, cmap: dict) -> str:
    """The precision table of every selection, the class map, and the top source classes of `label`."""
    rows = [[k, f"{v['overall']:.1%}", f"{v['hits']:,} / {v['counted']:,}", f"{v['unjudged']:,}",
             ", ".join(f"{s}: {cnt:,}" for s, cnt in v["by_source"].items())] for k, v in precision.items()]
    top = precision[label]["top_sources"]
    return ("<h2>Near-neighbour precision</h2>" + table(["selection", "precision", "hits / counted", "unjudged (no source class)", "selected by source"], rows)
            + "<p class='note'>Class map (teacher class &rarr; near-neighbour source classes):</p>"
            + table(["teacher class", "near neighbours"], [[k, ", ".join(x for x in v if not is_wnid(x)) or "(none: left out)"] for k, v in cmap.items()])
            + f"<h2>Most selected source classes per teacher class ({html.escape(label)})</h2>"
            + table(["teacher class", "top source classes (count)"], [[k, ", ".join(f"{s} ({n_})" for s, n_ in v)] for k, v in top.items()]))


def _body(sel_path: Path, sel: pa.Table, meta: dict, scan: dict, names, counts: dict, notes: list[str],
          plots: list[tuple[str, str]], prec_html: str) -> list[str]:
    """The page's parts in order: summary table, notes, each plot (the class counts under the histogram),
    precision, the selection's config."""
    cfg_json = html.escape(json.dumps(meta.get("config", {}), indent=1, sort_keys=True))
    head = table(["", "value"], [["selection", str(sel_path)], ["method", meta.get("method")],
                                 ["selected", f"{sel.num_rows:,}"], ["pool rows", f"{scan['total']:,}"],
                                 ["teacher sha256", str(meta.get("teacher_sha256"))[:16]],
                                 ["targets", json.dumps(meta.get("targets"))]])
    per_class = table(["class"] + list(counts), [[nm] + [f"{int(cnt[i]):,}" for cnt in counts.values()] for i, nm in enumerate(names)])
    body = [head] + [f"<p class='note'>{html.escape(x)}</p>" for x in notes]
    for title, plot in plots:
        body.append(f"<h2>{html.escape(title)}</h2>{plot}")
        if title.startswith("Teacher classes"):
            body.append(per_class)
    body.append(prec_html)
    body.append(f"<h2>Selection config</h2><pre style='font-size:12px'>{cfg_json}</pre>")
    return body
