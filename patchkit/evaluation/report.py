"""Showing an `EvalResult`: a terminal table, and a self-contained HTML report (inline CSS and SVG,
no script, nothing fetched) with score distributions, a trade-off plot and continuations side by side."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..core.stfile import atomic_write_bytes


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(c: dict | None) -> str:
    """diff [interval] with the simultaneous (corrected) interval and Holm p-value when present."""
    if not c:
        return "-"
    if "low_corrected" in c:
        return f"{c['diff']:+.3f} [{c['low_corrected']:+.3f}, {c['high_corrected']:+.3f}] p_holm={c['p_holm']:.3g}"
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def quality_lines(judges: list[dict]) -> list[str]:
    """Each judge's checked quality, one or more lines, for the top of a report."""
    lines = []
    for j in judges:
        c, q = j.get("check"), j.get("quality")
        if not c:
            lines.append(f"judge    {j['name']} [{j['kind']}]: not checked")
            continue
        lines.append(f"judge    {j['name']} [{j['kind']}]: {c['data']}: AUC {_f(c.get('auc'))}, accuracy {_f(c['accuracy'])} at its "
                     f"threshold {j['threshold']:g} (balanced {_f(c['balanced_accuracy'])}, recall {_f(c['recall'])}, "
                     f"specificity {_f(c['specificity'])}, n={c['n']})")
        if q and q.get("all"):
            a = q["all"]
            lines.append(f"           {a['data']}: AUC {_f(a.get('auc'))}, accuracy {_f(a['accuracy'])} (balanced {_f(a['balanced_accuracy'])}, n={a['n']})")
        fp = (q or {}).get("benign_false_positive")
        if fp:
            lines.append(f"           false positives on the base's continuations of benign requests: {fp['flagged']}/{fp['n']} = "
                         f"{_f(fp['rate'])} (assumes every such continuation is non-toxic)")
        bq = (q or {}).get("base_quantiles")
        if bq:
            lines.append("           scores of the base's continuations of the prompts: " + ", ".join(
                f"{k} {_f(v)}" for k, v in bq.items() if k.startswith("q") or k == "mean") + f" (n={bq['n']})")
    return lines


def power_line(result) -> str:
    """The minimum detectable effect per judge at the base rate (see patchkit.evaluation.stats.mde)."""
    pw = getattr(result, "power", None) or {}
    if not pw.get("judges"):
        return ""
    parts = [f"{jn.split(':')[0]} {100 * v['mde']:.1f} points at base rate {100 * v['base_rate']:.1f}% "
             f"({100 * v['mde_corrected']:.1f} after correction)" for jn, v in pw["judges"].items() if v.get("mde") is not None]
    return (f"power    minimum detectable change of the greedy rate over {pw['n_prompts']} prompts (two-sided alpha "
            f"{pw['alpha']:g}, power {pw['power']:g}, binomial approximation; corrected: alpha/{pw['family']}): " + "; ".join(parts))


def _metric_cols(result) -> list[tuple[str, str, str]]:
    """(judge, metric key, header) columns: mean and rate, plus the RTP pair for sampled runs."""
    cols = []
    s = result.settings
    for j in result.judges:
        keys = [("greedy_rate", f"greedy>={j['threshold']:g}")] if s.get("greedy") else [("rate", f"rate>={j['threshold']:g}")]
        if s["samples"] >= 1 and s.get("temperature", 0) > 0:
            keys += [("expected_max", "E[max]"), ("p_any", "P(any)")]
        keys += [("mean", "mean")]
        cols += [(j["name"], k, h) for k, h in keys]
    return cols


def render_table(result) -> str:
    """The result as plain text for a terminal."""
    s = result.settings
    modes = (["greedy"] if s.get("greedy", s["temperature"] <= 0) else []) + (
        [f"{s['samples']} samples at T={s['temperature']} (seed {s['seed']})"] if s["samples"] and s["temperature"] > 0 else [])
    src = result.sources
    lines = quality_lines(result.judges) + [
        f"model    {result.model}",
        f"prompts  {src['prompts']['n']} from {src['prompts']['source']}, {' + '.join(modes)}, {s['max_new_tokens']} new tokens"
        + (", chat template" if s["chat"] else ""),
        f"benign   {src['benign']['n']} texts from {src['benign']['source']} (perplexity, KL(base||condition) per token)",
    ]
    if s.get("control_seeds"):
        lines.append(f"controls {s['control_seeds']} seeds of each kind; effects are against their per-prompt mean")
    if power_line(result):
        lines.append(power_line(result))
    cols = _metric_cols(result)
    head = ["condition", "rows"] + [f"{jn.split(':')[0]} {h}" for jn, _k, h in cols] + ["ppl", "KL"]
    has_qa = any(c.qa for c in result.conditions)
    head += ["QA EM"] if has_qa else []
    rows = []
    for c in result.conditions:
        name = c.name if c.kind in ("base", "patch") else "  " + c.kind
        r = [name, str(c.rows)] + [_f(c.metrics[jn][k]) for jn, k, _h in cols]
        r += [_f(c.capability.get("perplexity"), 2), _f(c.capability.get("kl"), 4)]
        r += [_f((c.qa or {}).get("exact_match"))] if has_qa else []
        rows.append(r)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    lines += ["", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if result.comparisons:
        fam = result.comparisons[0]["vs_base"].get("family")
        lines += ["", "effects per prompt (greedy: greedy text flagged, 0/1; max: max score over the samples), paired bootstrap over "
                  f"prompts, simultaneous intervals and Holm-adjusted p-values over the {fam} comparisons:"]
        for r in result.comparisons:
            extra = "".join(f"; beyond {k[3:]} {_ci(v)}" for k, v in r.items() if k.startswith("vs_") and k != "vs_base")
            lines.append(f"  {r['patch']} {r['judge']} {r.get('metric', 'mean')}: vs base {_ci(r['vs_base'])}{extra}")
    lines += ["", (f"weights after evaluation: {'bit-identical to the base' if result.reverted_bit_identical else 'CHANGED'}; "
              f"{_f(result.timing['total_s'], 1)} s total, {_f(result.timing['prompts_per_s'], 1)} prompts/s generating")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- HTML
_COLORS = ["#555555", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}pre{white-space:pre-wrap}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}.hit{background:#fde2e2}
.small{font-size:12px;color:#555}svg{margin:0.5em 1em 0.5em 0}.cont td{max-width:330px;font-size:12px}"""


def _histogram_svg(result, judge: str, names: list[str], bins: int = 10) -> str:
    """Grouped bars: the share of prompts per bin of the per-prompt mean score, one colour a condition."""
    w, h, pad = 420, 200, 30
    conds = [c for c in result.conditions if c.name in names]
    counts = []
    for c in conds:
        per = [sum(r) / len(r) for r in c.scores[judge]]
        hist = [0] * bins
        for v in per:
            hist[min(bins - 1, int(v * bins))] += 1
        counts.append([x / len(per) for x in hist])
    bw = (w - 2 * pad) / bins / max(1, len(conds))
    parts = [f'<svg width="{w}" height="{h + 40}" role="img"><title>{html.escape(judge)}</title>',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>']
    for k, (c, hist) in enumerate(zip(conds, counts)):
        for b, frac in enumerate(hist):
            x = pad + b * (w - 2 * pad) / bins + k * bw
            bh = frac * (h - pad)
            parts.append(f'<rect x="{x:.1f}" y="{h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{_COLORS[k % len(_COLORS)]}">'
                         f"<title>{html.escape(c.name)} {b / bins:.1f}-{(b + 1) / bins:.1f}: {frac:.2f}</title></rect>")
        parts.append(f'<text x="{pad + 110 * k}" y="{h + 35}" font-size="11" fill="{_COLORS[k % len(_COLORS)]}">{html.escape(c.name[:18])}</text>')
    for b in (0, bins // 2, bins):
        parts.append(f'<text x="{pad + b * (w - 2 * pad) / bins:.0f}" y="{h + 14}" font-size="10" text-anchor="middle">{b / bins:.1f}</text>')
    parts.append(f'<text x="{pad}" y="14" font-size="12">{html.escape(judge)}: share of prompts by score</text></svg>')
    return "".join(parts)


def _tradeoff_svg(result, judge: str) -> str:
    """Each condition at (KL on benign text, rate of the judge): lower-left is better for a detox edit."""
    w, h, pad, label_room = 560, 260, 45, 150  # room on the right for the condition names
    pts = [(c.capability.get("kl") or 0.0, c.metrics[judge]["rate"], c) for c in result.conditions]
    xmax = max(p[0] for p in pts) * 1.15 or 1.0
    ymax = max(max(p[1] for p in pts) * 1.15, 0.05)
    X = lambda x: pad + x / xmax * (w - 2 * pad - label_room)
    Y = lambda y: h - pad - y / ymax * (h - 2 * pad)
    parts = [f'<svg width="{w}" height="{h}" role="img">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad - label_room}" y2="{h - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
             f'<text x="{(w - label_room) / 2}" y="{h - 8}" font-size="11" text-anchor="middle">mean KL(base||condition), nats/token (0 to {xmax:.3g})</text>',
             f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{html.escape(judge)} rate (0 to {ymax:.2g})</text>']
    for k, (x, y, c) in enumerate(pts):
        col = _COLORS[k % len(_COLORS)]
        parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="5" fill="{col}"><title>{html.escape(c.name)}: KL {x:.4f}, rate {y:.3f}</title></circle>')
        parts.append(f'<text x="{X(x) + 7:.1f}" y="{Y(y) - 6:.1f}" font-size="10" fill="{col}">{html.escape(c.kind if c.kind.startswith("random") else c.name)}</text>')
    return "".join(parts) + "</svg>"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(rows_ for rows_ in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def _td(x, num: bool = True, cls: str = "") -> str:
    return f'<td class="{"n " if num else ""}{cls}">{html.escape(x)}</td>'


def render_html(result, n_examples: int = 24) -> str:
    r = result
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>patchkit eval</title><style>{_CSS}</style></head><body>",
           "<h1>patchkit evaluation</h1>", f"<pre>{e(render_table(r))}</pre>"]
    cols = _metric_cols(r)
    rows = [[_td(c.name, False), _td(c.kind, False), _td(str(c.rows)), _td(_f(c.edit_norm))]
            + [_td(_f(c.metrics[jn][k])) for jn, k, _h in cols]
            + [_td(_f(c.capability.get("perplexity"), 3)), _td(_f(c.capability.get("kl"), 5))] for c in r.conditions]
    out += ["<h2>Numbers</h2>", _table(["condition", "kind", "rows", "edit norm"] + [f"{jn} {h}" for jn, _k, h in cols] + ["perplexity", "KL"], rows)]
    if r.comparisons:
        keys = sorted({k for c in r.comparisons for k in c if k.startswith("vs_")}, key=lambda k: k != "vs_base")
        rows = [[_td(c["patch"], False), _td(c["judge"], False), _td(c.get("metric", ""), False)] + [_td(_ci(c.get(k))) for k in keys]
                for c in r.comparisons]
        out += ["<h2>Effects (paired bootstrap over prompts; simultaneous intervals, Holm-adjusted p)</h2>",
                _table(["patch", "judge", "metric"] + [k.replace("vs_", "vs ") for k in keys], rows)]
    out.append("<h2>Judges</h2><ul>")
    for j in r.judges:
        c = j["check"]
        acc = f"accuracy {_f(c['accuracy'])}, balanced {_f(c['balanced_accuracy'])} on {c['n']} labelled texts of {c['data']}" if c else "not checked on labelled data"
        out.append(f"<li><b>{e(j['name'])}</b> ({e(j['kind'])}, threshold {j['threshold']}): {e(acc)}</li>")
    out.append("</ul><h2>Score distributions</h2>")
    patches = [c.name for c in r.conditions if c.kind == "patch"]
    for j in r.judges:
        for p in patches or ["base"]:
            out.append(_histogram_svg(r, j["name"], ["base"] + ([p] if p != "base" else [])))
    if len(r.conditions) > 2 and r.judges:
        out.append("<h2>Trade-off</h2>" + "".join(_tradeoff_svg(r, j["name"]) for j in r.judges))
    names = [c.name for c in r.conditions if c.kind in ("base", "patch")]
    conds = [r.condition(n) for n in names]
    rows = []
    for i, p in enumerate(r.prompts[:n_examples]):
        row = [_td(p, False)]
        for c in conds:
            text = c.continuations[i][0]
            hit = any(c.scores[j["name"]][i][0] >= j["threshold"] for j in r.judges)
            tags = " ".join(f"{j['name'].split(':')[0]}={c.scores[j['name']][i][0]:.2f}" for j in r.judges)
            row.append(f'<td class="{"hit" if hit else ""}">{e(text)}<div class="small">{e(tags)}</div></td>')
        rows.append(row)
    out += [f"<h2>Continuations (first {min(n_examples, len(r.prompts))}, first sample)</h2>", _table(["prompt"] + names, rows, "cont")]
    out.append(f"<h2>Settings</h2><pre>{e(json.dumps({'settings': r.settings, 'sources': r.sources, 'model_fingerprint': r.model_fingerprint}, indent=1))}</pre>")
    return "".join(out) + "</body></html>"


def write_report(result, directory) -> Path:
    """Write ``index.html`` and ``result.json`` into ``directory`` (each atomically); returns the page's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / "result.json", json.dumps(result.to_dict(), indent=1, sort_keys=True).encode())
    page = d / "index.html"
    atomic_write_bytes(page, render_html(result).encode())
    return page
