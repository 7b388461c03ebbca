"""The benchmark's output: a Markdown table, a JSON document and PNG plots (accuracy by method;
learning curves from each run's distill history.json)."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

from odsd_dist.tables import atomic_write_bytes, atomic_write_json

from .rows import as_text

GROUP_COLOURS = {"baseline": "#7f7f7f", "odsd": "#d62728", "method": "#9467bd", "ablation": "#ff9896", "reference": "#1f77b4",
                 "custom": "#2ca02c"}


def _stats(vals) -> dict:
    v = [x for x in vals if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0, "values": list(vals)}
    a = np.asarray(v, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a),
            "values": list(vals)}


def _pct(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    out = f"{100 * s['mean']:.2f}"
    return out + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def git_commit(root: Path) -> dict:
    def git(*args) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        except Exception:
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def summarise(raw: dict) -> list[dict]:
    """One entry per row: mean ± std over seeds of every reported figure, plus the tuning record."""
    rows = []
    for r in raw["results"]:
        row, runs = r["row"], r["runs"]
        d0 = runs[0]["distill"] if runs else {}
        rows.append({
            "name": row.name, "label": row.label, "group": row.group, "source": row.source, "what": row.what,
            "set": as_text(row.set), "chosen": r["tuning"]["chosen"], "tuning": r["tuning"],
            "seeds": [x["seed"] for x in runs],
            "train_images": d0.get("rows"), "steps": d0.get("steps"), "epochs": d0.get("epochs"),
            "test_last": _stats([(x.get("test") or {}).get("last") for x in runs]),
            "test_at_best_val": _stats([(x.get("test") or {}).get("at_best_val") for x in runs]),
            "val_last": _stats([x["val"]["last"] for x in runs]),
            "val_best": _stats([x["val"]["best"] for x in runs]),
            "best_val_epoch": [x["val"]["best_epoch"] for x in runs],
            "wall_s": _stats([x["wall_s"] for x in runs]),
            "images_per_s": _stats([x["distill"].get("samples_per_s") for x in runs]),
            "runs": runs,
        })
    return rows


def paired(a: dict, b: dict) -> Optional[dict]:
    """Test top-1 (last) of row `a` minus row `b`, seed by seed over the seeds both ran: mean, sample std and
    the seeds. Pairing takes out what a seed does to both (the student's initialisation, the data order)."""
    ta = {x["seed"]: (x.get("test") or {}).get("last") for x in a["runs"]}
    tb = {x["seed"]: (x.get("test") or {}).get("last") for x in b["runs"]}
    seeds = sorted(k for k in ta if ta[k] is not None and tb.get(k) is not None)
    if not seeds:
        return None
    d = np.asarray([ta[k] - tb[k] for k in seeds], np.float64)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else None, "seeds": seeds,
            "values": d.tolist()}


def targets(rows: list[dict]) -> dict:
    """The issue's targets, where the rows they compare are present (means over seeds, test top-1 last)."""
    m = {r["name"]: r["test_last"]["mean"] for r in rows}
    by = {r["name"]: r for r in rows}
    out = {}
    if all(m.get(k) is not None for k in ("odsd", "kd_pool", "oracle_kd")):
        gap = m["oracle_kd"] - m["kd_pool"]
        out["gap_closed"] = {"value": (m["odsd"] - m["kd_pool"]) / gap if abs(gap) > 1e-12 else None,
                             "target": 0.5, "formula": "(ODSD - KD_pool) / (oracle - KD_pool)"}
    if m.get("odsd") is not None and m.get("kd_maxprob") is not None:
        out["odsd_minus_kd_maxprob"] = {"value": m["odsd"] - m["kd_maxprob"], "target": 0.02,
                                        "paired": paired(by["odsd"], by["kd_maxprob"])}
    for k in ("odsd_maxprob", "odsd_full_targets", "odsd_no_lnkd", "odsd_no_self", "odsd_no_rel"):
        if m.get("odsd") is not None and m.get(k) is not None:
            out.setdefault("ablation_gain", {})[k] = m["odsd"] - m[k]
    for t in out.values():
        if isinstance(t, dict) and "target" in t and t.get("value") is not None:
            t["met"] = bool(t["value"] >= t["target"])
    return out


def markdown(doc: dict) -> str:
    s = doc["setup"]
    done = f"{len(doc['rows'])} of {len(doc.get('rows_planned') or doc['rows'])} rows"
    lines = [f"# Quality benchmark ({doc['mode']} mode)" + ("" if doc.get("complete", True) else f", {done} so far"), "",
             f"- command: `{doc['command']}`",
             f"- commit: `{doc['git']['commit']}`" + (" (with uncommitted changes)" if doc["git"]["dirty"] else ""),
             f"- finished: {doc['finished_at']}; {doc['seconds']:.0f} s in all; {doc['machine']}",
             f"- teacher: `{s['teacher']}` ({s['teacher_arch']}), test top-1 "
             + (f"{100 * s['teacher_test_top1']:.2f}%" if s.get("teacher_test_top1") is not None else "–"),
             f"- student `{s['student']}`; every row: {s['steps']} optimizer steps of global batch "
             f"{s['global_batch']} ({s['workers']} workers x {s['batch_size']}); N = {s['n']:,}; "
             f"pool {s['pool_rows'] if s['pool_rows'] is None else format(s['pool_rows'], ',')} scored images; "
             f"seeds {s['seeds']}",
             f"- splits: train {s['train_images']}, validation {s['val_images']} (hyper-parameters and best epoch), "
             f"test {s['test_images']} (reported once per configuration)"]
    runs = [x for r in doc["rows"] for x in r["runs"]]
    kept = [x["ledger"] for x in runs if x.get("ledger")]
    if kept:
        commits = sorted({k.get("commit") or "?" for k in kept})
        lines.append(f"- {len(kept)} of {len(runs)} runs taken from the ledger (finished in an earlier run; "
                     f"trained at commit {', '.join(commits)}; bench/quality/ledger.py)")
    if doc.get("left_out_rows"):
        lines.append(f"- quick mode leaves out the rows: {', '.join(doc['left_out_rows'])}")
    lines.append("")
    lines += ["| row | train images | test top-1 % (last) | test top-1 % (best-val epoch) | val top-1 % (best) | "
              "wall s | images/s | chosen on val |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        ips, wall = r["images_per_s"]["mean"], r["wall_s"]["mean"]
        chosen = " ".join(f"`{c}`" for c in r["chosen"]) or "–"
        if r["tuning"].get("shared_from") and r["chosen"]:
            chosen += f" (from {r['tuning']['shared_from']})"
        lines.append(f"| {r['label']} | {r['train_images'] if r['train_images'] is not None else '–'} | "
                     f"{_pct(r['test_last'])} | {_pct(r['test_at_best_val'])} | {_pct(r['val_best'])} | "
                     f"{'–' if wall is None else f'{wall:.0f}'} | {'–' if ips is None else f'{ips:.0f}'} | {chosen} |")
    lines += ["", "mean ± standard deviation over seeds (n = number of seeds; no ± with one seed). "
              "`last`: the student after the last step; `best-val epoch`: the student at the epoch with the best "
              "validation accuracy (– when the run did not keep it). "
              "Wall time: sample + distill + test eval of one run; "
              "images/s: distill training throughput.", ""]
    t = doc["targets"]
    if t:
        lines += ["## Targets (test top-1 last, means over seeds)", ""]
        if "gap_closed" in t:
            g = t["gap_closed"]
            lines.append(f"- {g['formula']} = " + ("–" if g["value"] is None else f"{g['value']:.2f}")
                         + f" (target >= {g['target']}): " + ("met" if g.get("met") else "not met"))
        if "odsd_minus_kd_maxprob" in t:
            g = t["odsd_minus_kd_maxprob"]
            pr = g.get("paired")
            spread = (f"; seed by seed {', '.join(f'{100 * v:+.2f}' for v in pr['values'])}"
                      + (f", {100 * pr['mean']:+.2f} ± {100 * pr['std']:.2f}" if pr["std"] is not None else "")
                      if pr else "")
            lines.append(f"- ODSD - KD on class-balanced maxprob top-N = {100 * g['value']:+.2f} points{spread} "
                         f"(target >= +2): " + ("met" if g.get("met") else "not met"))
        for k, v in (t.get("ablation_gain") or {}).items():
            lines.append(f"- ODSD - {k} = {100 * v:+.2f} points")
        lines.append("")
    lines += ["## Rows", ""]
    for r in doc["rows"]:
        lines.append(f"- **{r['label']}** (`{r['name']}`, {r['source']}): {r['what']}; "
                     f"settings `{' '.join(r['set'])}`")
    lines += ["", "Plots: `accuracy.png` (test top-1 by row), `curves.png` (validation top-1 and training loss "
              "by step). Raw numbers: `quality.json`.", ""]
    return "\n".join(lines)


def plot_accuracy(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        m = r["test_last"]["mean"]
        if m is None:
            continue
        ax.barh(y, 100 * m, xerr=100 * (r["test_last"]["std"] or 0), color=GROUP_COLOURS.get(r["group"], "#2ca02c"),
                alpha=0.85, capsize=3)
        vals = [v for v in r["test_last"]["values"] if v is not None]
        ax.scatter([100 * v for v in vals], [y] * len(vals), color="k", s=10, zorder=3)
        ax.text(100 * m + 0.5, y, f"{100 * m:.1f}", va="center", fontsize=8)
    t = doc["setup"].get("teacher_test_top1")
    if t is not None:
        ax.axvline(100 * t, color="k", ls="--", lw=1, label=f"teacher {100 * t:.1f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel("test top-1 % (last step; mean ± std over seeds, dots = seeds)")
    ax.set_title(f"Student accuracy by method ({doc['mode']} mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds at the steps every seed logged."""
    curves = [c for c in curves if c]
    if not curves:
        return np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not common:
        c = curves[0]
        return np.array([s for s, _ in c]), np.array([v for _, v in c])
    val = [np.mean([dict(c)[s] for c in curves]) for s in common]
    return np.array(common), np.array(val)


def plot_curves(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(doc["rows"]):
        colour, ls = cmap(i % 10), styles[(i // 10) % len(styles)]
        vx, vy = _mean_curve([[(e["step"], e["top1"]) for e in x["val"]["curve"]] for x in r["runs"]])
        if len(vx):
            a1.plot(vx, 100 * vy, marker="o", ms=3, color=colour, ls=ls, label=r["label"])
        lx, ly = _mean_curve([[(h["step"], h["loss"]) for h in x["train_curve"] if h["loss"] is not None
                               and math.isfinite(h["loss"])] for x in r["runs"]])
        if len(lx):
            a2.plot(lx, ly, color=colour, ls=ls, label=r["label"])
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("validation top-1 % (mean over seeds)")
    a1.set_title("Validation accuracy per epoch")
    a2.set_xlabel("optimizer step")
    a2.set_ylabel("training loss (total; each method its own loss)")
    a2.set_yscale("log")
    a2.set_title("Training loss")
    a1.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(raw: dict, qc, command: str, root: Path) -> dict:
    """quality.md, quality.json, accuracy.png, curves.png in the output folder; returns the JSON document."""
    from odsd_dist.models import read_model_meta

    setup = raw["setup"]
    rows = summarise(raw)
    cfg = qc.odsd
    from odsd_dist.config import build_config

    c0 = build_config(cfg)
    teacher_test = next((x["test"]["teacher"] for r in rows for x in r["runs"] if (x.get("test") or {}).get("teacher")
                         is not None), None)
    test_n = next((x["test"]["n"] for r in rows for x in r["runs"] if x.get("test")), None)
    sp = setup.splits
    doc = {
        "mode": qc.mode, "command": command, "git": git_commit(root),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": raw["seconds"],
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "setup": {
            "teacher": setup.teacher, "teacher_sha256": setup.teacher_sha256,
            "teacher_arch": read_model_meta(setup.teacher).get("arch"), "teacher_test_top1": teacher_test,
            "teacher_training": setup.teacher_summary,
            "student": c0.distill.student, "steps": c0.distill.steps, "batch_size": c0.distill.batch_size,
            "workers": c0.distill.workers, "global_batch": c0.distill.batch_size * c0.distill.workers,
            "n": c0.sample.n, "pool_rows": setup.score_summary.get("rows"), "score_dir": setup.score_dir,
            "score_seconds": setup.score_summary.get("seconds"), "seeds": qc.seeds, "tune_seed": raw["tune_seed"],
            "tune": qc.tune.model_dump(), "train_images": sp.get("train_images"), "val_images": sp.get("val_images"),
            "test_images": test_n, "splits": {k: sp.get(k) for k in ("train", "val", "test")},
        },
        "rows": rows, "targets": targets(rows), "config": qc.model_dump(),
        "left_out_rows": list(qc._left_out),
        "rows_planned": raw.get("rows_planned"), "complete": len(rows) == len(raw.get("rows_planned") or rows),
    }
    out = Path(qc.out)
    atomic_write_json(out / "quality.json", doc)
    atomic_write_bytes(out / "quality.md", markdown(doc).encode())
    plot_accuracy(doc, out / "accuracy.png")
    plot_curves(doc, out / "curves.png")
    return doc
