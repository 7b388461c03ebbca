"""`odsd shards verify`: what is in a set of shards, and what is damaged, before anything is scored.

Per shard and in total: samples, members by extension, damaged entries by quarantine reason (each
image is fully decoded with `decode_image`, so the reasons are exactly those the scorer will give),
intact count, whether the img2dataset Parquet sidecar is present and agrees, and tar read errors.
Keys are checked (`bad_key`) and duplicates found across all the given shards with the rule and code
of `odsd score` (shards/dupes.py: first occurrence in shard order wins, the rest `duplicate_key`), so
the counts are those the scorer will give. The duplicate pass here runs in this process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.parquet as pq
from tqdm import tqdm

from . import dupes as D
from .decode import DEFAULT_MAX_PIXELS, REASONS, Damaged, decode_sample
from .keys import key_problem, safe_repr
from .tario import expand_shards, iter_samples, shard_name, sidecar_path

VERIFY_SIZE = 32  # decode size: small, because only decodability is checked


def _check_sidecar(path: str, keys: list[str]) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        return {"present": False, "rows": None, "agrees": None}
    try:
        table = pq.read_table(side, columns=["key"]) if "key" in pq.read_schema(side).names else None
    except Exception as e:  # a broken sidecar is reported, not fatal
        return {"present": True, "rows": None, "agrees": False, "error": f"{type(e).__name__}: {e}"}
    if table is None:
        return {"present": True, "rows": pq.read_metadata(side).num_rows, "agrees": False, "error": "no key column"}
    side_keys = table.column("key").to_pylist()
    missing = sorted(set(keys) - set(side_keys))
    extra = sorted(set(side_keys) - set(keys))
    rec = {"present": True, "rows": len(side_keys), "agrees": len(side_keys) == len(keys) and not missing and not extra}
    if missing or extra:
        rec.update(missing_in_sidecar=len(missing), extra_in_sidecar=len(extra), examples=(missing + extra)[:5])
    return rec


def verify_shard(path: str, size: int = VERIFY_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Report for one tar (see module doc)."""
    t0 = time.time()
    errors: list[dict] = []
    members: dict[str, int] = {}
    damaged: dict[str, int] = {}
    entries: list[dict] = []
    keys: list[str] = []
    intact = 0
    for ordinal, sample in enumerate(iter_samples(path, errors=errors)):
        key = sample["__key__"]
        keys.append(key)
        for ext in sample:
            if not ext.startswith("__"):
                members[ext] = members.get(ext, 0) + 1
        try:
            decode_sample(sample, size, 3, max_pixels)
            intact += 1
        except Damaged as d:
            damaged[d.reason] = damaged.get(d.reason, 0) + 1
            entries.append({"key": safe_repr(key) if d.reason == "bad_key" else key, "ordinal": ordinal,
                            "reason": d.reason, "detail": d.detail})
    return {
        "path": str(path),
        "shard": shard_name(path),
        "samples": len(keys),
        "intact": intact,
        "members": dict(sorted(members.items())),
        "damaged": {r: damaged[r] for r in REASONS if r in damaged},
        "damaged_entries": entries,
        "sidecar": _check_sidecar(path, keys),
        "valid_keys": [(i, k) for i, k in enumerate(keys) if key_problem(k) is None],
        "tar_error": errors[0] if errors else None,
        "seconds": round(time.time() - t0, 3),
    }


def _apply_duplicates(reports: list[dict], dupes) -> None:
    """Make every later occurrence of a key a `duplicate_key` entry (it replaces any other reason, as in
    `odsd score`, where the reader marks it before any decoding)."""
    by_shard = {r["shard"]: r for r in reports}
    for row in dupes.to_pylist():
        r = by_shard[row["shard"]]
        entry = next((e for e in r["damaged_entries"] if e["ordinal"] == row["ordinal"]), None)
        if entry is None:
            r["intact"] -= 1
            entry = {"key": row["key"], "ordinal": row["ordinal"]}
            r["damaged_entries"].append(entry)
        else:
            r["damaged"][entry["reason"]] -= 1
        entry.update(reason="duplicate_key", detail=D.detail(row))
        r["damaged"]["duplicate_key"] = r["damaged"].get("duplicate_key", 0) + 1
    for r in reports:
        r["damaged_entries"].sort(key=lambda e: e["ordinal"])
        r["damaged"] = {k: r["damaged"][k] for k in REASONS if r["damaged"].get(k)}


def verify_shards(paths: Sequence[str] | str, size: int = VERIFY_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: Optional[bool] = None) -> dict:
    """Verify tars (folders expand to their *.tar; a missing path is a UserError naming it).

    Returns {"shards": [per-shard report], "total": {...}}; JSON-serialisable.
    """
    tars = expand_shards(paths)

    reports = []
    for p in tqdm(tars, desc="verify", unit="shard", leave=False, 
                  disable=progress is False or (progress is None and len(tars) < 2)):
        reports.append(verify_shard(p, size, max_pixels))
    dupes = D.find_duplicates_local([r.pop("valid_keys") for r in reports], [r["shard"] for r in reports])
    _apply_duplicates(reports, dupes)
    total: dict = {"shards": len(reports), "samples": 0, "intact": 0, "members": {}, "damaged": {},
                   "tar_errors": 0, "sidecars_missing": 0, "sidecars_disagree": 0, "duplicate_keys": dupes.num_rows}
    for r in reports:
        total["samples"] += r["samples"]
        total["intact"] += r["intact"]
        for k, n in r["members"].items():
            total["members"][k] = total["members"].get(k, 0) + n
        for k, n in r["damaged"].items():
            total["damaged"][k] = total["damaged"].get(k, 0) + n
        total["tar_errors"] += r["tar_error"] is not None
        total["sidecars_missing"] += not r["sidecar"]["present"]
        total["sidecars_disagree"] += r["sidecar"]["agrees"] is False
    total["members"] = dict(sorted(total["members"].items()))
    total["damaged"] = {k: total["damaged"][k] for k in REASONS if k in total["damaged"]}
    total["damaged_total"] = sum(total["damaged"].values())
    total["ok"] = total["tar_errors"] == 0 and total["sidecars_disagree"] == 0
    return {"shards": reports, "total": total}


def print_report(report: dict, max_listed: int = 10) -> None:
    """Human table: one line per shard, the totals, then damaged entries grouped by reason."""
    rows = [("shard", "samples", "intact", "damaged", "members", "sidecar", "tar")]
    for r in report["shards"]:
        side = r["sidecar"]
        side_s = "missing" if not side["present"] else (f"{side['rows']} ok" if side["agrees"] else f"{side['rows']} DIFFERS")
        rows.append((Path(r["path"]).name, f"{r['samples']:,}", f"{r['intact']:,}", str(sum(r["damaged"].values())),
                     " ".join(f"{k}={v}" for k, v in r["members"].items()), side_s,
                     "ERROR" if r["tar_error"] else "ok"))
    t = report["total"]
    rows.append(("TOTAL", f"{t['samples']:,}", f"{t['intact']:,}", str(t["damaged_total"]),
                 " ".join(f"{k}={v}" for k, v in t["members"].items()),
                 f"{t['sidecars_missing']} missing, {t['sidecars_disagree']} differ", f"{t['tar_errors']} errors"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            print("  ".join("-" * w for w in widths))
        print("  ".join(c.ljust(w) if j in (0, 4, 5, 6) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
    if t["damaged"]:
        print("\ndamaged by reason: " + ", ".join(f"{k}={v}" for k, v in t["damaged"].items()))
        for reason in t["damaged"]:
            entries = [(r["shard"], e) for r in report["shards"] for e in r["damaged_entries"] if e["reason"] == reason]
            print(f"  {reason} ({len(entries)}):")
            for shard, e in entries[:max_listed]:
                print(f"    {e['key']}  [{shard}]  {e['detail'][:90]}")
            if len(entries) > max_listed:
                print(f"    ... and {len(entries) - max_listed} more (--json lists all)")
    for r in report["shards"]:
        if r["tar_error"]:
            print(f"tar error in {r['path']}: {r['tar_error']['error']} after {r['tar_error']['samples_read']} samples")
        side = r["sidecar"]
        if side["present"] and side["agrees"] is False:
            print(f"sidecar of {r['path']} disagrees: {side}")
    verdict = "OK" if t["ok"] else "PROBLEMS"
    print(f"\n{verdict}: {t['samples']:,} samples in {t['shards']} shards, {t['intact']:,} intact, "
          f"{t['duplicate_keys']} duplicate keys, "
          f"{t['damaged_total']} damaged (quarantined by the scorer, not fatal)")
