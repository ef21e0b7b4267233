"""The measured steps of the scale curve, for one size at a time, and the start-up times.

``curve_size`` builds one layout, its patch and a probe, then runs (a)-(g) on it, each step in a fresh
process and warm unless marked cold: (a) the naive load-edit-save, (b) cp -r, (c) patchkit apply -o,
(d) apply --in-place and (e) revert --in-place on a copy (byte-compared after every revert), (f) the
naive compute against ``patchkit compute``, (g) ``patchkit.patched`` on a loaded model against loading
the patched checkpoint. It deletes the layout's files before it returns the medians and the checks.
``startup_times`` measures ``patchkit --help``, ``inspect`` and ``status`` (wall and import time).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from applylib.layouts import (ALPHA, LAYOUTS, PATCH_FRACTION, curve_patch, curve_probe, curve_specs, gate_names,
                              layout_files, nbytes, write_layout)
from applylib.measure import BigMem, Runner, drop_caches, identical_files, rmtree, summarize, warm
from applylib.floor import FLOOR, floor_plan, parse_floor
from applylib.profiling import profile_inplace
from applylib.scripts import LOAD_PATCHED, NAIVE, PATCHED_LIVE, naive_compute_script


def gate_digest(ckpt: Path, cfg: dict) -> str:
    """sha256 over the bytes of every gate_proj tensor (to compare outputs without keeping both)."""
    import hashlib

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.tensorio import read_tensor

    ck, h = Checkpoint(ckpt), hashlib.sha256()
    for name in gate_names(cfg):
        h.update(memoryview(np.ascontiguousarray(read_tensor(ck.info(name)))).cast("B"))
    return h.hexdigest()


def startup_times(runner: Runner, patchkit_bin: str, patch: Path, ckpt: Path, reps: int) -> dict:
    """Wall time (median of `reps`) and import time (-X importtime, top-level imports summed) of
    `patchkit --help`, `patchkit inspect PATCH`, `patchkit status DIR`."""
    out = {}
    for label, args in [("--help", ["--help"]), ("inspect", ["inspect", str(patch)]), ("status", ["status", str(ckpt)])]:
        walls = [runner.measure([patchkit_bin, *args], label)["wall_s"] for _ in range(reps)]
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "patchkit", *args], capture_output=True, text=True)
        imp, heavy = 0, []
        for line in r.stderr.splitlines():
            parts = line.split("|")
            if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            if not parts[2].startswith("  "):  # a top-level import (its name is not indented)
                imp += int(parts[1])
                heavy.append((int(parts[1]), parts[2].strip()))
        out[label] = {"wall_s": statistics.median(walls), "best_s": min(walls), "wall_s_all": [round(w, 4) for w in walls],
                      "import_s": imp / 1e6, "top_imports": [f"{n} {c / 1000:.1f} ms" for c, n in sorted(heavy)[-5:][::-1]]}
    return out


def curve_size(key: str, args, runner: Runner, log, work: Path, patchkit_bin: str, dropped: bool) -> dict:
    layout, cfg, k = LAYOUTS[key]
    total_rows = cfg["intermediate_size"] * cfg["num_hidden_layers"]
    k = k or int(PATCH_FRACTION * total_rows)
    big = key == "7b"
    base, runs = work / f"base-{key}", work / f"runs-{key}"
    rmtree(runs)
    runs.mkdir()
    need = sum(nbytes(s) for _, s, _ in curve_specs(cfg))
    free = shutil.disk_usage(work).free
    want = 2 * need + (2 << 30)  # the base and one copy of it at a time, and some room
    if free < want:
        raise SystemExit(f"error: {layout} needs about {want / 1e9:.1f} GB free in {work}, there are "
                         f"{free / 1e9:.1f} GB: {(want - free) / 1e9:.1f} GB missing")
    load_before = os.getloadavg()[0]
    log(f"\n==== {layout}: {need / 1e9:.2f} GB bf16, {k:,} of {total_rows:,} gate_proj rows; {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    total = write_layout(base, cfg, log)
    gen_s = time.perf_counter() - t0
    files = layout_files(base)
    patch = runs / "p.safetensors"
    pinfo = curve_patch(base, patch, cfg, k)
    log(f"  generated in {gen_s:.1f} s; patch {pinfo['bytes']:,} bytes, {pinfo['tensors']} tensors, {'/'.join(pinfo['encodings'])}")
    reps, naive_reps = args.reps, (1 if big else args.naive_reps)
    res: dict[str, list[dict]] = {}
    notes: list[str] = []

    def run(step, cmd, heavy=False, cache=(base,), cold=False):
        if cold:
            drop_caches()
        else:
            warm(*cache)
        if heavy and big:  # the naive steps need over 3 GB at 7B only (2.5 GB at 1.1B)
            with BigMem():
                r = runner.measure(cmd, step)
        else:
            r = runner.measure(cmd, step)
        res.setdefault(step + ("-cold" if cold else ""), []).append(r)
        return r

    # (a) naive apply
    naive_out = runs / "naive-out"
    for _ in range(naive_reps):
        rmtree(naive_out)
        r = run("a", [sys.executable, "-c", NAIVE, str(base), str(patch), str(naive_out)], heavy=True)
        log(f"  (a) {r['wall_s']:.2f} s {r['rss_mb']:.0f} MB")
    naive_digest = gate_digest(naive_out, cfg)
    rmtree(naive_out)
    # (b) cp -r, (c) apply -o: one untimed copy first (the first big write after deletions is slow)
    dst, out = runs / "cp-out", runs / "apply-out"
    subprocess.run(["cp", "-r", str(base), str(dst)], check=True)
    rmtree(dst)
    for rep in range(reps):
        run("b", ["cp", "-r", str(base), str(dst)])
        rmtree(dst)
        run("c", [patchkit_bin, "apply", str(patch), str(base), "-o", str(out)])
        if rep == 0:
            same = gate_digest(out, cfg) == naive_digest
            notes.append(f"(a) and (c) wrote {'the same' if same else 'DIFFERENT'} gate_proj bytes")
        rmtree(out)
        log(f"  rep {rep + 1}: (b) {res['b'][-1]['wall_s']:.2f} s  (c) {res['c'][-1]['wall_s']:.2f} s {res['c'][-1]['rss_mb']:.0f} MB")
    if big and dropped:  # once each from a cold page cache (before the copy below: two copies at most)
        for step, cmd in [("b", ["cp", "-r", str(base), str(dst)]),
                          ("c", [patchkit_bin, "apply", str(patch), str(base), "-o", str(out)])]:
            run(step, cmd, cold=True)
            rmtree(dst)
            rmtree(out)
    # (d) apply --in-place and (e) revert --in-place, on a copy; byte-compared after every revert
    inplace = runs / "inplace"
    shutil.copytree(base, inplace)
    identical_all = True
    for rep in range(reps):
        run("d", [patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], cache=(inplace,))
        run("e", [patchkit_bin, "revert", str(patch), str(inplace), "--in-place"], cache=(inplace,))
        same, diffs = identical_files(base, inplace, files)
        identical_all &= same
        log(f"  rep {rep + 1}: (d) {res['d'][-1]['wall_s']:.3f} s {res['d'][-1]['rss_mb']:.0f} MB  "
            f"(e) {res['e'][-1]['wall_s']:.3f} s {res['e'][-1]['rss_mb']:.0f} MB  identical after revert: {same}")
    notes.append("after every (e) the copy is byte-identical to the base (cmp, no .patchkit/ left)" if identical_all
                 else "REVERT DID NOT RESTORE THE ORIGINAL BYTES")
    # the floor of (d): read, hash, durable undo, arithmetic, durable writes of the same rows (applylib/floor.py)
    floor_npz = runs / "floor.npz"
    floor_plan(inplace, patch, floor_npz)
    for _ in range(reps):
        r = run("floor", [sys.executable, "-c", FLOOR, str(floor_npz), str(runs / "floor.undo")], cache=(inplace,))
        r.update(parse_floor(r["stdout"]))
        (runs / "floor.undo").unlink()
    same, _ = identical_files(base, inplace, files)
    identical_all &= same
    fl = summarize(res["floor"])
    log(f"  floor: {fl['wall_s']:.3f} s (numpy start-up {fl['start_s']:.3f}, read {fl['read_s']:.3f}, sha256 {fl['sha256_s']:.3f}, "
        f"undo {fl['undo_s']:.3f}, arithmetic {fl['arithmetic_s']:.3f}, writes {fl['write_s']:.3f})")
    profile = profile_inplace(patchkit_bin, patch, inplace, runs) if args.profile else None
    if big and dropped:  # once each from a cold page cache
        run("d", [patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], cold=True)
        run("e", [patchkit_bin, "revert", str(patch), str(inplace), "--in-place"], cold=True)
    # (g) patched() on a loaded model, against loading the patched checkpoint (the copy, patched)
    subprocess.run([patchkit_bin, "apply", str(patch), str(inplace), "--in-place"], check=True, capture_output=True)
    for _ in range(1 if big else reps):
        r = run("g-live", [sys.executable, "-c", PATCHED_LIVE, str(base), str(patch), "3"], heavy=True)
        r.update(json.loads(r["stdout"].splitlines()[-1]))
        r = run("g-load", [sys.executable, "-c", LOAD_PATCHED, str(inplace)], heavy=True, cache=(inplace,))
        r.update(json.loads(r["stdout"].splitlines()[-1]))
    status_s = runner.measure([patchkit_bin, "status", str(inplace)], "status")["wall_s"]
    rmtree(inplace)
    # (f) compute: the naive way (compute.py's NAIVE) against `patchkit compute`
    probe, naive_rows, pk_patch = runs / "probe.safetensors", runs / "naive-rows.json", runs / "computed.safetensors"
    curve_probe(base, probe, cfg)
    for _ in range(naive_reps):
        rmtree(naive_out)
        run("f-naive", [sys.executable, "-c", naive_compute_script(), str(base), str(probe), str(naive_out), str(k),
                        str(ALPHA), str(naive_rows)], heavy=True)
        log(f"  (f) naive {res['f-naive'][-1]['wall_s']:.2f} s {res['f-naive'][-1]['rss_mb']:.0f} MB")
    rmtree(naive_out)
    for _ in range(reps):
        run("f", [patchkit_bin, "compute", str(base), "--probe", str(probe), "-o", str(pk_patch), "--top-k", str(k),
                  "--alpha", str(ALPHA), "--overwrite"])
    from patchkit.core.patchfile import Patch

    chosen = {(n, int(r)) for n, rows in json.loads(naive_rows.read_text()).items() for r in rows}
    got = {(n, int(r)) for n, e in Patch.load(pk_patch).edits.items() for r in e.rows.tolist()}
    notes.append(f"(f) naive and patchkit compute chose {'the same' if chosen == got else 'DIFFERENT'} {len(got):,} rows")
    rmtree(runs)
    rmtree(base)
    summary = {s: summarize(rs) for s, rs in res.items()}
    return {"size": key, "layout": layout, "bytes": total, "shards": len(files), "generated_s": gen_s, "patch": pinfo,
            "results": summary, "notes": notes, "identical": identical_all, "profile": profile,
            "status_s": status_s, "naive_reps": naive_reps, "reps": reps,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
