"""The scale curve drawn as a small log-log SVG (--svg, or --plot JSON --svg PATH from an earlier run).

``curve_svg`` plots the median wall time of the naive apply, the naive compute, cp -r, apply -o,
patchkit compute, apply --in-place, revert --in-place and the floor of an in-place apply (when the run
measured it) against the checkpoint's size, one
coloured line each, from the report that the --sizes run prints and writes as JSON. Standard
library only; the file is written whole.
"""

from __future__ import annotations

from pathlib import Path


def curve_svg(report: dict, path: Path) -> None:
    """The curve as a small log-log SVG: median time of (a)-(e) and (f) against the checkpoint's size."""
    import math

    series = [("a", "naive apply", "#c0392b"), ("f-naive", "naive compute", "#e67e22"), ("b", "cp -r", "#7f8c8d"),
              ("c", "apply -o", "#2980b9"), ("f", "patchkit compute", "#8e44ad"), ("d", "apply --in-place", "#27ae60"),
              ("e", "revert --in-place", "#16a085"), ("floor", "floor of in-place", "#000000")]
    sizes = report["sizes"]
    xs = [s["bytes"] / 1e9 for s in sizes]
    ys = [s["results"][k]["wall_s"] for s in sizes for k, _, _ in series if k in s["results"]]
    w, h, left, right, top, bottom = 640, 400, 60, 150, 20, 50
    x0, x1 = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def px(x):
        return left + (math.log10(x) - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return h - bottom - (math.log10(y) - y0) / (y1 - y0) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for e in range(y0, y1 + 1):
        y = py(10.0 ** e)
        out += [f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#ddd"/>',
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{10.0 ** e:g} s</text>']
    for s, x in zip(sizes, xs):
        out += [f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{h - bottom}" stroke="#eee"/>',
                f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{s["layout"]}</text>',
                f'<text x="{px(x):.1f}" y="{h - bottom + 30}" text-anchor="middle">{x:.2f} GB</text>']
    series = [t for t in series if any(t[0] in s["results"] for s in sizes)]
    for i, (k, label, color) in enumerate(series):
        pts = [(px(x), py(s["results"][k]["wall_s"])) for s, x in zip(sizes, xs) if k in s["results"]]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        out.append(f'<text x="{w - right + 10}" y="{top + 14 + 16 * i}" fill="{color}">{label}</text>')
    out.append(f'<text x="{left}" y="{h - 8}">median wall time, warm page cache; checkpoint size (log scales)</text></svg>')
    Path(path).write_text("\n".join(out) + "\n")
