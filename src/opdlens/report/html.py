"""Self-contained ``index.html``: tables, embedded figures and a token-level alignment view.

No external resources: CSS and the small teacher-selector script are inline, figures are
``data:image/png;base64`` URIs. Each token of a representative path is a ``<span>`` whose
background encodes the node's alignment (:func:`alignment_color`: red -1, white 0, green +1,
grey for invalid nodes) and whose ``data-tip`` attribute is shown as a tooltip on hover.
All text coming from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from opdlens.diagnose.children import parse_children
from opdlens.display import display_text
from opdlens.report.render import Table, fmt, inline_code, render_html_table

__all__ = [
    "GREEN",
    "GREY",
    "RED",
    "WHITE",
    "alignment_color",
    "display_token",
    "render_page",
    "render_token_view",
    "token_tooltip",
    "two_child_tip",
]

RED: tuple[int, int, int] = (215, 48, 39)
WHITE: tuple[int, int, int] = (255, 255, 255)
GREEN: tuple[int, int, int] = (26, 152, 80)
#: colour of invalid nodes (not in the S_u filter) or of a NaN alignment
GREY = "#d4d4d4"


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(c)):02x}" for c in rgb)


def alignment_color(value: float | None) -> str:
    """Background colour of a node: linear red (-1) -> white (0) -> green (+1); grey if NaN.

    Values outside [-1, 1] are clipped. Returns ``#rrggbb``.
    """
    if value is None:
        return GREY
    v = float(value)
    if math.isnan(v):
        return GREY
    v = min(1.0, max(-1.0, v))
    end = GREEN if v >= 0 else RED
    t = abs(v)
    return _hex([w + (e - w) * t for w, e in zip(WHITE, end)])


def display_token(text: object) -> str:
    """Escaped, whitespace-visible display of a token.

    Newlines become a ``↵`` marker followed by a real line break (the token container uses
    ``white-space: pre-wrap``), tabs a ``→`` marker plus the tab, carriage returns ``␍``; an
    empty token shows ``∅``. Spaces are kept (``pre-wrap`` preserves them).
    """
    s = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    if s == "":
        return '<span class="sp">∅</span>'
    out = []
    for ch in s:
        if ch == "\n":
            out.append('<span class="sp">↵</span>\n')
        elif ch == "\t":
            out.append('<span class="sp">→</span>\t')
        elif ch == "\r":
            out.append('<span class="sp">␍</span>')
        elif (shown := display_text(ch)) != ch:  # a bidi or control character: shown as its escape
            out.append(f'<span class="sp">{html.escape(shown)}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _show(text: object, newlines: bool = False) -> str:
    """Data text (an id, a name, a question) HTML-escaped and shown as written (:func:`display_text`)."""
    return html.escape(display_text(text, newlines=newlines))


def _int(x: object) -> str:
    try:
        return str(int(x))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "n/a"


def _num(x: object, digits: int = 3, signed: bool = False) -> str:
    return fmt(x, digits, signed=signed).replace("–", "n/a")


def _token_repr(text: object) -> str:
    """A token text on one tooltip line: quoted, with newlines and tabs as escapes."""
    return repr(str(text))[:40]


def two_child_tip(estimator: object = None) -> str:
    """The tooltip note of a valid two-child node under the renormalised reading of S_u (the
    literal reading gives two-child nodes any value, and no note): the cosine is ±1 at any
    success rates; what the shown value is depends on ``signals.alignment_estimator`` (None:
    unknown, both are said)."""
    shown = {
        "plugin": "shown: that sign (plug-in)",
        "posterior_mean": "shown: 2P - 1, P = probability the sign is + (posterior mean)",
    }.get(str(estimator), "shown: the sign (plug-in) or 2P - 1 (posterior mean)")
    return f"(2 children: the cosine is ±1 at any P_succ, only its sign informs; {shown})"


def token_tooltip(row: pd.Series | dict, metric: str, two_child: str | None = None) -> str:  # type: ignore[type-arg]
    """Tooltip text of one node: alignment, probabilities, P_succ, advantage, visits, KL and,
    when the node table has a ``children`` column, the competing children the alignment is
    computed from (text, P_θ, P_te, P_succ, visits). ``two_child`` (:func:`two_child_tip`) is
    appended to the alignment line of a valid node with two children."""
    r = row
    valid = bool(r.get("valid", False))
    visits_s = _int(r.get("visits"))
    n_children = _int(r.get("n_children"))
    lines = [
        f"node {r.get('node')}  token id {r.get('token_id')}"
        + ("" if valid else "  (invalid node: not enough visited children)"),
        f"{metric} = {_num(r.get(metric), signed=True)}"
        + (
            f"   95% [{_num(r.get(metric + '_lo'), signed=True)}, {_num(r.get(metric + '_hi'), signed=True)}]"
            if metric + "_lo" in r
            else ""
        )
        + (f"   {two_child}" if two_child and valid and n_children == "2" else ""),
        f"P_student = {_num(r.get('p_student'))}   P_teacher = {_num(r.get('p_teacher'))}",
        f"P_succ = {_num(r.get('psucc_token'))}   teacher adv = {_num(r.get('teacher_adv'), signed=True)}",
        f"visits = {visits_s}   children = {n_children}   KL = {_num(r.get('kl'), 4)}",
    ]
    kids = parse_children(r.get("children"))
    if kids:
        lines.append("children in S_u:  P_θ      P_te     P_succ  visits")
        lines += [
            f"  {_token_repr(c.get('text')):<14} {_num(c.get('p_student'))}    {_num(c.get('p_teacher'))}    "
            f"{_num(c.get('psucc'), 2)}    {_int(c.get('visits'))}"
            for c in kids
        ]
    return "\n".join(lines)


def _embed_png(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def _legend(metric: str) -> str:
    stops = ", ".join(alignment_color(v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0))
    return (
        '<div class="legend">'
        f'<span class="lbl">{html.escape(metric)}:</span>'
        '<span class="lbl">-1 harmful</span>'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        '<span class="lbl">+1 helpful</span>'
        f'<span class="swatch" style="background:{GREY}"></span>'
        '<span class="lbl">invalid node (fewer than 2 sufficiently visited next tokens)</span>'
        '<span class="lbl">· hover a token for details; ↵ marks a newline</span>'
        "</div>"
    )


def render_token_view(
    nodes: pd.DataFrame,
    questions: pd.DataFrame,
    paths: pd.DataFrame,
    path_stats: pd.DataFrame,
    teachers: Sequence[str],
    metric: str,
    *,
    max_questions: int = 20,
    max_tokens: int = 2000,
    inputs: pd.DataFrame | None = None,
    two_child: str | None = None,
) -> str:
    """The per-teacher token views: for each question and representative path, coloured tokens.

    ``inputs`` (``question_id``, ``question_text``, ``gold``) adds each question's text and gold
    answer above its paths; ``two_child`` is the tooltip note of two-child nodes
    (:func:`two_child_tip`, None for none).

    One ``<div class="teacher-view" data-teacher=...>`` per teacher; all but the first start
    hidden and the teacher selector switches between them. At most ``max_questions`` questions
    (in sorted order) and ``max_tokens`` tokens per path are rendered; the page says so when it
    truncates.
    """
    e = html.escape
    qids = sorted(nodes["question_id"].astype(str).unique())
    shown_q = qids[:max_questions]
    qinfo = questions.assign(question_id=questions["question_id"].astype(str)).set_index("question_id")
    pinfo = paths.assign(question_id=paths["question_id"].astype(str)).set_index(["question_id", "path_id"])
    st = path_stats.assign(question_id=path_stats["question_id"].astype(str)).set_index(
        ["teacher", "question_id", "path_id"]
    )
    sub = nodes[nodes["question_id"].astype(str).isin(shown_q)].copy()
    sub["question_id"] = sub["question_id"].astype(str)
    sub = sub.sort_values(["teacher", "question_id", "path_id", "node"], kind="stable")
    groups = {k: g for k, g in sub.groupby(["teacher", "question_id", "path_id"], sort=False)}
    texts: dict[str, tuple[object, object]] = {}
    if inputs is not None and not inputs.empty:
        texts = {str(r.question_id): (r.question_text, r.gold) for r in inputs.itertuples(index=False)}

    out = []
    if len(qids) > len(shown_q):
        out.append(
            f"<p class='note'>Showing {len(shown_q)} of {len(qids)} questions (raise max_questions to see more).</p>"
        )
    for ti, teacher in enumerate(teachers):
        hidden = " hidden" if ti else ""
        out.append(f'<div class="teacher-view" data-teacher="{_show(teacher)}"{hidden}>')
        for q in shown_q:
            qi = qinfo.loc[q] if q in qinfo.index else None
            qmeta = ""
            if qi is not None:
                qmeta = (
                    f" <span class='meta'>student success rate {fmt(qi.get('success_rate'))}, "
                    f"{_int(qi.get('n_rollouts'))} rollouts, {_int(qi.get('n_targeted'))} "
                    "targeted rollouts</span>"
                )
            out.append(f"<section class='question'><h3>Question {_show(q)}{qmeta}</h3>")
            if q in texts:
                qtext, gold = texts[q]
                out.append(
                    f"<div class='qinfo'><pre class='qtext'>{_show(qtext, newlines=True)}</pre>"
                    f"<b>gold answer:</b> <code>{_show(gold)}</code></div>"
                )
            path_ids = sorted({int(k[2]) for k in groups if k[0] == teacher and k[1] == q})
            for pid in path_ids:
                g = groups[(teacher, q, pid)]
                correct = bool(g["path_correct"].iloc[0])
                s = st.loc[(teacher, q, pid)] if (teacher, q, pid) in st.index else None
                mean_s = fmt(s["mean"], signed=True) if s is not None else "–"
                if s is not None and math.isfinite(
                    float(s.get("mean_lo", math.nan))
                ):  # rollout-noise interval of the mean
                    mean_s += f" (95% [{fmt(s['mean_lo'], signed=True)}, {fmt(s['mean_hi'], signed=True)}])"
                nval = int(s["n_valid"]) if s is not None else 0
                length = ""
                if (q, pid) in pinfo.index:
                    length = f", {pinfo.loc[(q, pid), 'length']} tokens"
                badge = (
                    "<span class='badge ok'>correct</span>" if correct else "<span class='badge bad'>incorrect</span>"
                )
                out.append(
                    f"<div class='path' data-question='{_show(q)}' data-path='{pid}'>"
                    f"<div class='path-head'>path {pid} {badge} <span class='meta'>mean "
                    f"{e(metric)} {mean_s} over {nval} valid of {len(g)} nodes{length}</span></div>"
                )
                rows = g.head(max_tokens).to_dict("records")
                spans = []
                for r in rows:
                    valid = bool(r.get("valid", False))
                    a = r.get(metric) if valid else float("nan")
                    a = float("nan") if a is None else float(a)
                    color = alignment_color(a)
                    cls = "tok" if valid and not math.isnan(a) else "tok inv"
                    tip = e(token_tooltip(r, metric, two_child), quote=True).replace("\n", "&#10;")
                    spans.append(
                        f'<span class="{cls}" style="background:{color}" data-tip="{tip}">'
                        f"{display_token(r.get('token_text'))}</span>"
                    )
                out.append("<div class='tokens'>" + "".join(spans) + "</div>")
                if len(g) > max_tokens:
                    out.append(f"<p class='note'>… {len(g) - max_tokens} more tokens not shown.</p>")
                if (q, pid) in pinfo.index:
                    text = pinfo.loc[(q, pid), "text"]
                    if isinstance(text, str) and text:
                        out.append(
                            f"<details><summary>path text</summary><pre>{_show(text, newlines=True)}</pre></details>"
                        )
                out.append("</div>")
            out.append("</section>")
        out.append("</div>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1150px;
 padding:16px 24px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:1.2em 0 .4em}
ul.notes{font-size:.85em;color:#555;margin:.3em 0 .6em;padding-left:1.2em}
ul.answer{font-size:1.05em;margin:.3em 0 .8em;padding-left:1.2em} ul.answer li{margin:.2em 0}
details{margin:.6em 0} details>summary{cursor:pointer;color:#444;font-weight:600}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0 1em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td:first-child,th:first-child,td.txt{text-align:left}
code{background:#f0f0f0;padding:0 3px;border-radius:3px}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;flex:1 1 480px} figure.wide{flex-basis:100%}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.8em;color:#555}
.controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:5}
.legend{display:flex;align-items:center;gap:8px;flex-wrap:wrap;font-size:.85em;margin-top:6px}
.legend .bar{display:inline-block;width:180px;height:14px;border:1px solid #999}
.legend .swatch{display:inline-block;width:16px;height:14px;border:1px solid #999}
.meta{font-weight:normal;color:#666;font-size:.85em}
.path{margin:.6em 0 1.2em}
.path-head{font-size:.9em;margin-bottom:3px}
.badge{font-size:.75em;padding:1px 6px;border-radius:8px;color:#fff}
.badge.ok{background:#2e7d32} .badge.bad{background:#c62828}
.tokens{font-family:Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;overflow-wrap:anywhere;tab-size:4;
 border:1px solid #ddd;padding:6px;line-height:1.75;background:#fafafa}
.tok{position:relative;border-radius:2px;padding:1px 0;cursor:default}
.tok:hover{outline:1px solid #333}
.tok:hover::after{content:attr(data-tip);position:absolute;left:0;top:1.6em;z-index:10;
 background:#222;color:#fff;padding:5px 8px;border-radius:4px;white-space:pre;font-size:12px;
 line-height:1.35;pointer-events:none}
.sp{color:#999}
.note{font-size:.85em;color:#777}
details pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:6px}
.qinfo{font-size:.85em;margin:.2em 0 .6em}
.qtext{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:6px;max-height:9em;overflow:auto;margin:.2em 0}
"""

_JS = """
(function(){
  var sel=document.getElementById('teacher-select');
  if(!sel){return;}
  function show(){
    var views=document.querySelectorAll('.teacher-view');
    for(var i=0;i<views.length;i++){views[i].hidden=(views[i].getAttribute('data-teacher')!==sel.value);}
  }
  sel.addEventListener('change',show);
  show();
})();
"""


def figures_html(figures: Sequence[tuple[str, str, Path]], first_wide: bool) -> str:
    """Figures ``(title, caption, png path)`` embedded as base64, side by side."""
    parts = ["<div class='figs'>"]
    for i, (ftitle, caption, p) in enumerate(figures):
        wide = " class='wide'" if first_wide and i == 0 else ""
        parts.append(
            f"<figure{wide}><img alt='{_show(ftitle)}' src='{_embed_png(p)}'>"
            f"<figcaption><b>{_show(ftitle)}</b>. {_show(caption)}</figcaption></figure>"
        )
    parts.append("</div>")
    return "".join(parts)


def render_page(
    *,
    title: str,
    answer: Sequence[str],
    answer_figures: Sequence[tuple[str, str, Path]],
    overview: Sequence[str],
    choices: Table | None,
    tables: Sequence[Table],
    figures: Sequence[tuple[str, str, Path]],
    token_view: str,
    teachers: Sequence[str],
    metric: str,
) -> str:
    """Assemble the page: the answer and its figures first, then what the run was (folded:
    definitions, notes, the run's choices), the tables, the other figures and the tokens.
    ``figures`` are ``(title, caption, png path)``, embedded as base64."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_show(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_show(title)}</h1>",
        "<section id='answer'><h2>The answer</h2><ul class='answer'>",
        "".join(f"<li>{inline_code(line)}</li>" for line in answer),
        "</ul>",
        figures_html(answer_figures, first_wide=False) if answer_figures else "",
        "</section>",
        "<details id='about'><summary>About this run: definitions and notes</summary><ul class='notes'>",
        "".join(f"<li>{inline_code(line)}</li>" for line in overview),
        "</ul></details>",
    ]
    if choices is not None:
        parts.append(
            "<details id='choices'><summary>Choices of this run (every result-changing setting)</summary>"
            f"{render_html_table(choices)}</details>"
        )
    parts += [render_html_table(t) for t in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts.append(figures_html(figures, first_wide=True))
    # the value is the views' data-teacher: both the name as shown (display_text)
    opts = "".join(f"<option value='{_show(t)}'>{_show(t)}</option>" for t in teachers)
    parts.append(
        "<h2 id='tokens'>Tokens of the representative paths</h2>"
        "<div class='controls'><label>teacher: <select id='teacher-select'>"
        f"{opts}</select></label>{_legend(metric)}</div>"
    )
    parts.append(token_view)
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def render_study_page(
    *,
    title: str,
    runs: Sequence[tuple[str, str | None, str]],
    tables: Sequence[Table],
    figures: Sequence[tuple[str, str, Path]],
) -> str:
    """The study's self-contained page (``opdlens compare``): its runs, each linked to its own
    report's token view when that report exists (``(label, relative href or None, note)``), then
    the figures and the tables."""
    items = []
    for label, href, note in runs:
        link = f"<a href='{html.escape(href, quote=True)}'>{_show(label)}</a>" if href else _show(label)
        items.append(f"<li>{link} <span class='note'>{_show(note)}</span></li>")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_show(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_show(title)}</h1>",
        "<h2>Runs (each run's report, with its token view)</h2><ul class='runs'>",
        "".join(items),
        "</ul>",
        figures_html(figures, first_wide=True) if figures else "",
    ]
    parts += [render_html_table(t) for t in tables]
    parts.append("</body></html>")
    return "\n".join(parts)
