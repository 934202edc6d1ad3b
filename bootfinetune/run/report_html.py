"""report.html: the run's report.json drawn for people (loss curves, metric bars, stage times).

One self-contained file: inline SVG and CSS, no scripts, no fonts or files fetched, so it
opens the same from a laptop, a cluster's shared disk or a bucket.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from bootfinetune.run.rundir import RunDir

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-12:  # the last tick is at or above the highest value
        ticks.append(round(start + len(ticks) * step, 10))
    return ticks


def line_chart(series: list[dict[str, Any]], *, title: str, x_label: str, y_label: str,
               width: int = 640, height: int = 300) -> str:
    """An SVG line chart. Each series: {"name", "points": [(x, y)...], "dashed": bool, "markers": bool}."""
    pts = [p for s in series for p in s["points"] if p[1] is not None and math.isfinite(p[1])]
    if not pts:
        return f'<p class="empty">{html.escape(title)}: no data.</p>'
    left, right, top, bottom = 56, 16, 28, 44
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    # Losses that fall over two decades or more get a log axis: on a linear one the late curve is a flat line.
    log = min(ys) > 0 and max(ys) / min(ys) >= 100
    if log:
        y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        y1 = y1 if y1 > y0 else y0 + 1
        y_ticks = [10.0 ** k for k in range(y0, y1 + 1)]
        y_label = f"{y_label} (log scale)"
    else:
        y_ticks = _nice_ticks(0.0 if min(ys) >= 0 else min(ys), max(ys))
        y0, y1 = y_ticks[0], y_ticks[-1] if y_ticks[-1] > y_ticks[0] else y_ticks[0] + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        v = math.log10(y) if log else y
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="18" class="title">{html.escape(title)}</text>']
    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    for t in _nice_ticks(x0, x1, 6):
        if x0 <= t <= x1 + 1e-9:
            out.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" class="axis"/>'
               f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" class="axis"/>'
               f'<text x="{(left + width - right) / 2}" y="{height - 8}" class="label" text-anchor="middle">'
               f'{html.escape(x_label)}</text>'
               f'<text x="14" y="{(top + height - bottom) / 2}" class="label" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{html.escape(y_label)}</text>')
    legend_y = top + 4
    for i, s in enumerate(series):
        color = s.get("color") or COLORS[i % len(COLORS)]
        good = [(x, y) for x, y in s["points"] if y is not None and math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(good))
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        if s.get("markers") or len(good) == 1:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>' for x, y in good]
        out.append(f'<rect x="{width - right - 170}" y="{legend_y - 9}" width="12" height="3" fill="{color}"/>'
                   f'<text x="{width - right - 152}" y="{legend_y - 4}" class="legend">{html.escape(s["name"])}</text>')
        legend_y += 16
    out.append("</svg>")
    return "".join(out)


def bar_chart(bars: list[tuple[str, float | None]], *, title: str, width: int = 420, height: int = 260) -> str:
    """An SVG bar chart of values in [0, 1] (the metric), one bar per label; None is drawn as 'n/a'."""
    left, right, top, bottom = 44, 16, 28, 40
    plot_h = height - top - bottom
    slot = (width - left - right) / max(1, len(bars))
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="18" class="title">{html.escape(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - t)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    for i, (label, value) in enumerate(bars):
        cx = left + slot * (i + 0.5)
        if value is None:
            out.append(f'<text x="{cx:.1f}" y="{top + plot_h - 6}" class="tick" text-anchor="middle">n/a</text>')
        else:
            v = max(0.0, min(1.0, float(value)))
            h = plot_h * v
            out.append(f'<rect x="{cx - slot * 0.3:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.6:.1f}" '
                       f'height="{h:.1f}" fill="{COLORS[i % len(COLORS)]}"/>'
                       f'<text x="{cx:.1f}" y="{top + plot_h - h - 6:.1f}" class="value" text-anchor="middle">'
                       f'{value:.3f}</text>')
        out.append(f'<text x="{cx:.1f}" y="{height - bottom + 18}" class="label" text-anchor="middle">'
                   f'{html.escape(label)}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/></svg>')
    return "".join(out)


def _usage_totals(summaries: list[dict]) -> tuple[int, int, float, list[str]]:
    """Prompt tokens, completion tokens, the known cost and the models without a price, over usage sections."""
    prompt = completion = 0
    cost, unpriced = 0.0, []
    for usage_by_model in summaries:
        for model, usage in (usage_by_model or {}).items():
            prompt += usage.get("prompt_tokens") or 0
            completion += usage.get("completion_tokens") or 0
            if usage.get("cost_usd") is None:
                unpriced.append(model)
            else:
                cost += usage["cost_usd"]
    return prompt, completion, cost, sorted(set(unpriced))


def teacher_usage(boot: dict) -> str:
    """The teacher's tokens and cost over the trainset and valset bootstraps of a report, in one phrase.

    >>> teacher_usage({"usage": {"openai/x": {"calls": 2, "prompt_tokens": 300, "completion_tokens": 20,
    ...                                       "cost_usd": 0.0012}}, "val": {"usage": {}}})
    '320 tokens (300 prompt, 20 completion), $0.0012'
    >>> teacher_usage({"usage": {"openai/mine": {"calls": 1, "prompt_tokens": 10, "completion_tokens": 2,
    ...                                          "cost_usd": None}}})
    '12 tokens (10 prompt, 2 completion), cost unknown (no price for openai/mine)'
    """
    if "usage" not in boot:
        return "n/a (not recorded)"
    prompt, completion, cost, unpriced = _usage_totals([boot.get("usage"), (boot.get("val") or {}).get("usage")])
    if not prompt and not completion and not unpriced:
        return "none (no teacher call: traces reused)"
    priced = f"cost unknown (no price for {', '.join(unpriced)})" if unpriced else f"${cost:.4g}"
    return f"{prompt + completion} tokens ({prompt} prompt, {completion} completion), {priced}"


def student_usage(evaluate: dict) -> str:
    """The student's tokens while the valset was scored, before and after finetuning (the report's
    stages.evaluate), in one phrase, with the answers cut at their token limit. A local model has no price,
    so no cost is given.

    >>> student_usage({"usage": {"before": {"m": {"calls": 4, "prompt_tokens": 400, "completion_tokens": 90, "cut": 3}},
    ...                          "after": {"m": {"calls": 4, "prompt_tokens": 400, "completion_tokens": 30}}}})
    'before 490 (400 prompt, 90 completion; 3 of 4 answers cut at the token limit), after 430 (400 prompt, 30 completion)'
    """
    usage = evaluate.get("usage")
    if not usage:
        return "n/a (not evaluated)"
    parts = []
    for when in ("before", "after"):
        prompt, completion, _, _ = _usage_totals([usage.get(when)])
        models = (usage.get(when) or {}).values()
        cut, calls = sum(m.get("cut") or 0 for m in models), sum(m.get("calls") or 0 for m in models)
        more = f"; {cut} of {calls} answers cut at the token limit" if cut else ""
        parts.append(f"{when} {prompt + completion} ({prompt} prompt, {completion} completion{more})")
    return ", ".join(parts)


def _loss_series(key: str, summary: dict[str, Any], color: str) -> list[dict[str, Any]]:
    """Train loss by optimizer step (the step curve, or per-epoch means) and eval loss per epoch."""
    series = []
    curve = summary.get("loss_curve") or []
    epochs = len(summary.get("train_loss") or [])
    steps_per_epoch = summary.get("steps_per_epoch") or 0
    if curve:
        series.append({"name": f"{key} train", "points": [(p[0], p[1]) for p in curve], "color": color})
    elif summary.get("train_loss"):
        series.append({"name": f"{key} train (epoch mean)", "color": color, "markers": True,
                       "points": [((i + 1) * (steps_per_epoch or 1), v) for i, v in enumerate(summary["train_loss"])]})
    evals = summary.get("eval_loss") or []
    if any(v is not None for v in evals) and epochs:
        points = [(0, summary.get("eval_loss_before"))] if summary.get("eval_loss_before") is not None else []
        points += [((i + 1) * (steps_per_epoch or 1), v) for i, v in enumerate(evals)]
        series.append({"name": f"{key} eval", "points": points, "color": color, "dashed": True, "markers": True})
    return series


def render_report(report: dict[str, Any], *, title: str = "bootfinetune run") -> str:
    """The HTML page for a report.json dict."""
    stages = report.get("stages", {})
    metric = report.get("metric") or {}
    finetune = {k: v for k, v in (stages.get("finetune") or {}).items() if isinstance(v, dict)}
    boot = stages.get("bootstrap") or {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if report.get("run_dir"):
        parts.append(f'<p class="path">{html.escape(str(report["run_dir"]))}</p>')

    parts.append('<section class="row">')
    parts.append(bar_chart([("before", metric.get("before")), ("after", metric.get("after")),
                            ("teacher", metric.get("teacher"))],
                           title=f"Metric on the valset ({metric.get('examples', 0)} examples)"))
    rows = [("examples bootstrapped", boot.get("examples")), ("kept by the metric", boot.get("kept")),
            ("failed", boot.get("failed")), ("teacher calls", boot.get("teacher_calls")),
            ("teacher tokens and cost", teacher_usage(boot)),
            ("student tokens, scoring the valset", student_usage(stages.get("evaluate") or {})),
            ("models trained", len(finetune))]
    for key, f in finetune.items():
        rows.append((f"{key}: best epoch / eval loss",
                     f"{f.get('best_epoch')} / {_fmt((f.get('eval_loss') or [None])[(f.get('best_epoch') or 1) - 1])}"))
    parts.append('<table class="facts">' + "".join(
        f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(_fmt(b))}</td></tr>" for a, b in rows) + "</table>")
    parts.append("</section>")

    series = []
    for i, (key, f) in enumerate(finetune.items()):
        series += _loss_series(key, f, COLORS[i % len(COLORS)])
    parts.append(line_chart(series, title="Finetuning loss (answer tokens)", x_label="optimizer step",
                            y_label="loss", width=860, height=340))

    timing = [(name, (stages.get(name) or {}).get("seconds")) for name in ("bootstrap", "data", "finetune", "evaluate")]
    val_seconds = ((boot.get("val") or {}).get("seconds"))
    parts.append("<h2>Time per stage</h2><table class=\"stages\"><tr><th>stage</th><th>seconds</th></tr>" + "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(s, 1)}</td></tr>" for n, s in timing)
        + (f"<tr><td>bootstrap (valset)</td><td>{_fmt(val_seconds, 1)}</td></tr>" if val_seconds else "")
        + "</table>")
    if finetune:
        parts.append("<h2>Models</h2><table class=\"stages\"><tr><th>key</th><th>epochs</th><th>train loss (last)"
                     "</th><th>eval loss (best)</th><th>tokens</th><th>seconds</th></tr>" + "".join(
                         f"<tr><td>{html.escape(k)}</td><td>{len(f.get('train_loss') or [])}</td>"
                         f"<td>{_fmt((f.get('train_loss') or [None])[-1])}</td>"
                         f"<td>{_fmt(min([v for v in (f.get('eval_loss') or []) if v is not None], default=None))}</td>"
                         f"<td>{_fmt(f.get('tokens'))}</td><td>{_fmt(f.get('seconds'), 1)}</td></tr>"
                         for k, f in finetune.items()) + "</table>")
    style = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px 32px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}.path{color:#6b7280;margin:0 0 16px;font-size:13px}
.row{display:flex;gap:32px;align-items:flex-start;flex-wrap:wrap}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 12px;border-bottom:1px solid #e5e7eb;text-align:left}
table.facts th{font-weight:500;color:#374151}.chart{display:block;margin:8px 0}
.chart .title{font-size:14px;font-weight:600;text-anchor:middle}.chart .tick{font-size:11px;fill:#6b7280}
.chart .label{font-size:12px;fill:#374151}.chart .legend{font-size:12px;fill:#111827}.chart .value{font-size:12px;font-weight:600}
.chart .grid{stroke:#e5e7eb}.chart .axis{stroke:#9ca3af}.empty{color:#6b7280}"""
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report_html(run: RunDir, *, title: str | None = None) -> Path:
    """Writes `report.html` beside `report.json` and returns its path."""
    report = {**run.read_report().to_json(), "run_dir": str(run.root)}
    return run.write_report_page(render_report(report, title=title or f"bootfinetune: {run.root.name}"))
