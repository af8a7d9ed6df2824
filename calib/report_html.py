"""One self-contained HTML page from the report document: matplotlib plots and images inlined as base64.

doc --plots (Agg, PNG, base64)--> accuracy vs size (Pareto front), KL per level, vision SQNR,
                                  exact match per question type (heat map)
    --tables (report_md rows)--> language, vision, cross matrix, noise floor, provenance
    --worst examples--> thumbnail of the image, question, expected, both answers
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from . import report_md as R
from .levels import REFERENCE_LANGUAGE, REFERENCE_VISION

MIB = 2**20
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d232a;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;
padding-bottom:4px}.sub{color:#5b6773;margin:0 0 16px}
.rec{background:#eef7ee;border:1px solid #9cc99c;border-radius:6px;padding:12px 16px;font-size:15px}
.rec.fail{background:#fbeeee;border-color:#d99a96}.note{background:#f6f8fa;border:1px solid #dde3ea;
border-radius:6px;padding:8px 12px;margin:8px 0}.note.warn{background:#fff8e6;border-color:#e8c36a}
td.nm{color:#8a949e;font-style:italic}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}.grid img,.plot img{width:100%;height:auto;
border:1px solid #e3e7ec;border-radius:4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #dde3ea;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f6f9;white-space:normal;vertical-align:bottom;max-width:90px}td:first-child,th:first-child{text-align:left}
td.note{white-space:normal;text-align:left;color:#5b6773;min-width:200px}
.wrap{overflow-x:auto}.ex{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{border:1px solid #dde3ea;border-radius:6px;padding:8px;display:flex;gap:10px;align-items:flex-start}
.card img{width:96px;height:96px;image-rendering:pixelated;border-radius:3px;flex:none}
.card>div{min-width:0;overflow-wrap:anywhere}.card .q{font-weight:600}
.plot.wide{max-width:860px}.bad{color:#b3261e}.good{color:#1e7b34}.muted{color:#5b6773;font-size:12px}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_size(doc: dict) -> str:
    """Exact-match change vs the reference (paired 95% CI) against total size; Pareto front on EM."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = doc["cells"]
    rec = doc["recommendation"].get("cell")
    ax.axhline(0, color="#222", lw=0.8)
    for r in rows:
        x, y = r["size_bytes"] / MIB, r["em_change"]
        lo, hi = r["em_change_ci"]
        colour = "#1f5fbf" if r["pareto"] else "#9aa5b1"
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="o", ms=4.5, color=colour, ecolor=colour,
                    alpha=0.8, capsize=2, lw=0.8)  # fmt: skip
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["size_bytes"])
    ax.step([r["size_bytes"] / MIB for r in front], [r["em_change"] for r in front], where="post",
            color="#1f5fbf", lw=1.2, label="Pareto front (size, exact match)")  # fmt: skip
    for i, r in enumerate(front):
        ax.annotate(r["name"], (r["size_bytes"] / MIB, r["em_change"]), textcoords="offset points",
                    xytext=(5, 8 if i % 2 else -12), fontsize=7, color="#1f5fbf")  # fmt: skip
    ref = next(r for r in rows if r["reference"])
    ax.scatter([ref["size_bytes"] / MIB], [0], marker="s", s=60, color="#222", zorder=5,
               label=f"reference fp32 + F32 ({ref['em']:.1f}% exact match)")  # fmt: skip
    if rec:
        r = next(r for r in rows if r["name"] == rec)
        ax.scatter([r["size_bytes"] / MIB], [r["em_change"]], marker="*", s=220, color="#e8a400",
                   edgecolor="#222", zorder=6, label=f"recommended: {rec}")  # fmt: skip
    if doc["budget"].get("max_size_mib"):
        ax.axvline(doc["budget"]["max_size_mib"], color="#b3261e", ls="--", lw=1, label="size budget")
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("total size, vision + language (MiB, log scale)")
    ax.set_ylabel("exact-match change vs reference, points\n(paired bootstrap 95% CI)")
    ax.set_title("Accuracy vs size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _plain_ticks(axis) -> None:
    """A log axis labelled 2, 3, 5, 10, 20 ... (MiB) instead of matplotlib's 2x10^0 mathtext."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def fmt(v, _pos):
        return f"{v:g}" if v >= 1 else f"{v:.2g}"

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def plot_kl(doc: dict) -> str:
    plt = _plt()
    rows = [r for r in doc["cells"] if r["vision"] == REFERENCE_VISION and not r["reference"]]
    vis = [r for r in doc["cells"] if r["language"] == REFERENCE_LANGUAGE and not r["reference"]]
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.2), gridspec_kw={"width_ratios": [max(len(rows), 1),
                             max(len(vis), 1)]})  # fmt: skip
    for ax, rs, title, key in ((axes[0], rows, "language levels (vision fp32)", "language"),
                               (axes[1], vis, "vision levels (language F32)", "vision")):  # fmt: skip
        if not rs:  # only the reference on this axis: nothing to draw on a log scale
            ax.text(0.5, 0.5, "no levels measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
            continue
        names = [r[key] for r in rs]
        x = range(len(rs))
        # log axis: zeros (identical distributions) sit at a floor below the smallest measured value
        positive = [v for r in rs for v in (r["kl"]["mean"], r["kl"]["max"]) if v and v > 0]
        floor = min(positive) / 10 if positive else 1e-12
        ax.bar(x, [max(r["kl"]["mean"], floor) for r in rs], color="#1f5fbf", label="mean")
        ax.scatter(x, [max(r["kl"]["p99"], floor) for r in rs], marker="_", s=200, color="#b3261e",
                   label="p99", zorder=3)  # fmt: skip
        ax.scatter(x, [max(r["kl"]["max"], floor) for r in rs], marker="x", s=25, color="#444",
                   label="max", zorder=3)  # fmt: skip
        noise = doc.get("noise_floor")
        if noise and noise["kl"]["max"] > 0:
            ax.axhline(noise["kl"]["max"], color="#888", ls=":", lw=1, label="noise floor (max)")
        ax.set_yscale("log")
        ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("KL(reference || level), nats")
    axes[0].legend(fontsize=7)
    fig.suptitle("Next-token KL divergence over reference answers", fontsize=11, y=1.04)
    return _png(fig)


def plot_types(doc: dict) -> str:
    plt = _plt()
    types = doc["evalset"]["types"]
    rows = [r for r in doc["cells"] if r["pareto"] or r["reference"]]
    rows.sort(key=lambda r: -r["size_bytes"])
    data = [[r["by_type"][t] for t in types] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, max(3.6, 0.45 * len(rows) + 1.8)))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact match %", shrink=0.8)
    ax.set_title("Exact match % per question type\n(reference + Pareto front, largest first)", fontsize=10)
    return _png(fig)


def _thumb(folder: Path, rel: str, size: int = 96) -> str:
    """The image as the model saw it (runtime/vision/images.py: upright, alpha on white), as an inline PNG."""
    from tinygptv_edge.runtime.errors import ImageError
    from tinygptv_edge.runtime.vision.images import load_image

    try:
        im = load_image(folder / rel)
    except ImageError:
        return ""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _heat(text: str, lo: float, hi: float) -> str:
    """A background from red (at `lo`) to green (at `hi`; lo > hi flips it) for a numeric cell."""
    try:
        v = float(text.rstrip("*"))
    except ValueError:
        return ""
    t = min(max((v - lo) / (hi - lo), 0.0), 1.0)
    return f' style="background:hsl({120 * t:.0f},65%,86%)"'


def _table_html(
    head: list[str], rows: list[list[str]], note_col: str | None = None, heat: tuple | None = None
) -> str:
    """`heat` = (red at, green at): colour the value cells on that scale."""
    if not head:
        return "<p class=muted>not measured</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        tds = []
        for i, (h, c) in enumerate(zip(head, r, strict=True)):
            attr = ' class="note"' if h == note_col else ' class="nm"' if c == R.NOT_MEASURED else ""
            if heat is not None and i > 0:
                attr += _heat(c, *heat)
            tds.append(f"<td{attr}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (
        f'<div class="wrap"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _examples(doc: dict) -> str:
    folder = Path(doc["evalset"]["folder"])
    cards = []
    for x in doc["examples"]:
        e = html.escape
        src = _thumb(folder, x["image"])
        ok = "bad" if x.get("wrong") else "good"
        cards.append(
            f'<div class="card"><img src="{src}" alt="{e(x["image"])}"><div>'
            f'<div class="q">{e(x["question"])}</div>'
            f"<div>expected: <b>{e(x['expected'])}</b></div>"
            f"<div>reference: {e(x['reference_answer']) or '<i>(empty)</i>'}</div>"
            f'<div class="{ok}">{e(x["cell"])}: {e(x["answer"]) or "<i>(empty)</i>"}</div>'
            f'<div class="muted">{e(x["type"])} · {"wrong" if x.get("wrong") else "right"} · KL '
            f"{x['kl_mean']:.3g}{' · flipped' if x['flipped'] else ''}</div></div></div>"
        )
    return f'<div class="ex">{"".join(cards)}</div>'


def _img(alt: str, b64: str, cls: str = "plot") -> str:
    return f'<div class="{cls}"><img alt="{alt}" src="data:image/png;base64,{b64}"></div>'


def _sample(doc: dict) -> str:
    """Whether the sample separates the levels; a warning when it cannot."""
    sample = doc.get("sample")
    if not sample:
        return ""
    cls = "note" if sample["separates"] else "note warn"
    return f'<p class="{cls}">{html.escape(sample["text"])}</p>'


def _recommendation(doc: dict) -> str:
    """The advice box, or a failure box when no measured cell meets the budget."""
    text = html.escape(doc["recommendation"]["text"])
    if R.budget_met(doc):
        return f'<div class="rec"><b>Recommendation.</b> {text}</div>'
    return f'<div class="rec fail"><b>Budget not met.</b> {text}</div>'


def render_html(doc: dict) -> str:
    e, s = doc["evalset"], doc["settings"]
    ref_em = next(r["em"] for r in doc["cells"] if r["reference"])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>TinyGPT-V edge: accuracy per quantization level</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Accuracy drop per quantization level</h1>",
        f'<p class="sub">Reference {REFERENCE_VISION} + {REFERENCE_LANGUAGE} · {e["questions"]} questions on '
        f"{e['images']} images · greedy answers (max {s['max_new_tokens']} tokens) · "
        f"{s['threads']} thread{'s' if s['threads'] != 1 else ''} · "
        f"CIs: paired bootstrap ({s['n_boot']} resamples)</p>",
        f'<p class="note">{html.escape(R.mode_note(doc))}</p>',
        _sample(doc),
        _recommendation(doc),
        '<h2>Accuracy vs size, and KL divergence</h2><div class="grid">',
        _img("accuracy vs size", plot_accuracy_vs_size(doc)),
        _img("exact match per type", plot_types(doc)),
        "</div>",
        _img("KL per level", plot_kl(doc), "plot wide"),
        "<h2>Language levels (vision fp32)</h2>",
        _table_html(*R.language_rows(doc)),
        f"<p class=muted>{html.escape(R.speed_note(doc))}</p>",
        "<h2>Vision levels (language F32)</h2>",
        _table_html(*R.vision_rows(doc), note_col="note"),
        "<h2>Exact match % per cell (* Pareto front; green: as the reference, red: 10 points or more below)"
        "</h2>",
        _table_html(*R.matrix_rows(doc, "em"), heat=(ref_em - 10, ref_em)),
        *(
            [f"<h2>{html.escape(R.peak_title(doc))}</h2>", _table_html(*R.peak_rows(doc))]
            if doc.get("schema", 0) >= 3
            else []
        ),
        "<h2>Answers flipped vs the reference, % (red: 20% or more)</h2>",
        _table_html(*R.matrix_rows(doc, "flip_rate"), heat=(20, 0)),
        f"<h2>Worst examples</h2><p class=muted>{html.escape(R.examples_title(doc))} The level's answer is "
        "green when it matches the expected answer, red when it does not.</p>",
        _examples(doc),
        *(
            ["<h2>Levels that could not be built</h2>", _table_html(*R.failed_rows(doc), note_col="error")]
            if R.failed_rows(doc)[0]
            else []
        ),
        "<h2>Noise floor</h2>",
        _table_html(*R.noise_rows(doc)),
        "<h2>Provenance</h2>",
        _table_html(["item", "value"], [[k, str(v)] for k, v in doc["provenance"].items()], note_col="value"),
        "</body></html>",
    ]
    return "\n".join(parts)
