"""Tests of opdlens.report: files, numbers in summary.md / CSVs, HTML tokens, colours, figures."""

from __future__ import annotations

import base64
import math
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from opdlens.diagnose.choices import run_choices
from opdlens.errors import OpdlensError
from opdlens.report import CSV_FILES, FIGURE_FILES, write_report
from opdlens.report.analyze import analyze
from opdlens.report.html import GREY, alignment_color, display_token
from opdlens.report.nodes import DIVERGENCE_COLUMNS
from opdlens.report.render import fmt, fmt_ci, fmt_p
from opdlens.report.stats import t_interval

NAN = float("nan")
TEACHERS = ["ext-4B", "self-1C"]
TOKENS = {
    # (question, path): token texts
    ("q1", 0): ["The", " answer", " is", "\n", " 42", "."],
    ("q1", 1): ["<script>alert(1)</script>", " &", "\t", "", " 7"],
    ("q2", 0): [" Let", " x", " =", " 3"],
    ("q2", 1): [" so", "\n\n", " 5", " <b>"],
}
CORRECT = {("q1", 0): True, ("q1", 1): False, ("q2", 0): True, ("q2", 1): False}


def _align(teacher: str, q: str, path: int, u: int) -> float:
    """Deterministic alignment pattern with exact 1 / -1 / 0 and invalid (NaN) nodes."""
    if (q, path, u) == ("q1", 0, 0):
        return 1.0
    if (q, path, u) == ("q1", 0, 1):
        return -1.0
    if (q, path, u) == ("q1", 0, 2):
        return NAN
    if (q, path, u) == ("q1", 0, 3):
        return 0.0
    rng = np.random.default_rng(zlib.crc32(f"{teacher}/{q}/{path}/{u}".encode()))
    base = 0.2 if teacher == "self-1C" else -0.1
    return float(np.clip(base + rng.normal(0, 0.5), -1, 1))


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rows = []
    for teacher in TEACHERS:
        for (q, p), toks in TOKENS.items():
            n = len(toks)
            for u, tok in enumerate(toks):
                a = _align(teacher, q, p, u)
                valid = not math.isnan(a)
                rows.append(
                    {
                        "question_id": q,
                        "path_id": p,
                        "path_correct": CORRECT[(q, p)],
                        "teacher": teacher,
                        "node": u,
                        "depth_norm": u / n,
                        "token_id": 1000 + u,
                        "token_text": tok,
                        "valid": valid,
                        "n_children": 3 if valid else 1,
                        "visits": 20 + u,
                        "p_student": 0.25,
                        "p_teacher": 0.5,
                        "psucc_token": 0.75 if valid else NAN,
                        "teacher_adv": 0.125,
                        "align_gkd": a,
                        "align_single": a,
                        "align_minillm": a,
                        "align_drgrpo": 1.0 if valid else NAN,
                        "norm_ideal": 1.0 + u,
                        "norm_gkd": 0.5,
                        "kl": 0.1 * u + (0.3 if teacher == "ext-4B" else 0.0),
                        "js": 0.05 * ((u * 7) % 5),
                        "l2": 0.2 * ((u * 3) % 4),
                        "cos_prob": 1.0 - 0.1 * u,
                    }
                )
    nodes = pd.DataFrame(rows)
    questions = pd.DataFrame(
        {
            "question_id": ["q1", "q2"],
            "n_rollouts": [64, 64],
            "success_rate": [0.625, 0.25],
            "n_targeted": [300, 120],
        }
    )
    paths = pd.DataFrame(
        [
            {"question_id": q, "path_id": p, "correct": CORRECT[(q, p)], "length": len(t), "text": "".join(t)}
            for (q, p), t in TOKENS.items()
        ]
    )
    return nodes, questions, paths


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, data) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("report")
    extra_png = out.parent / "curve.png"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot(1, 1, 1).plot([0, 1, 2], [3, 1, 2])
    fig.savefig(extra_png)
    nodes, questions, paths = data
    index = write_report(out, nodes, questions, paths, extra=[("training loss", extra_png)])
    assert index == out / "index.html"
    return out


# --------------------------------------------------------------------------------------------
# colours and token display
# --------------------------------------------------------------------------------------------


def test_alignment_color_endpoints_and_interpolation() -> None:
    assert alignment_color(1.0) == "#1a9850"
    assert alignment_color(-1.0) == "#d73027"
    assert alignment_color(0.0) == "#ffffff"
    assert alignment_color(NAN) == GREY and alignment_color(None) == GREY
    assert alignment_color(5.0) == "#1a9850" and alignment_color(-3.0) == "#d73027"
    # halfway between white (255) and green (26, 152, 80): 140.5 -> 140 (banker's), 203.5, 167.5
    assert alignment_color(0.5) == "#" + "".join(f"{round(255 + (e - 255) * 0.5):02x}" for e in (26, 152, 80))


def test_display_token_escapes_and_shows_whitespace() -> None:
    assert display_token("<script>") == "&lt;script&gt;"
    assert display_token("a&b") == "a&amp;b"
    assert display_token("\n") == '<span class="sp">↵</span>\n'
    assert display_token("") == '<span class="sp">∅</span>'
    assert display_token(" x") == " x"


# --------------------------------------------------------------------------------------------
# files, CSVs and summary.md numbers
# --------------------------------------------------------------------------------------------


def test_all_files_written(report: Path) -> None:
    for name in [*CSV_FILES.values(), "summary.md", "index.html"]:
        assert (report / name).is_file(), name
    for name in [*FIGURE_FILES.values(), "extra_0.png"]:
        assert (report / "figures" / name).is_file(), name


def test_csvs_match_analysis(report: Path, data) -> None:  # type: ignore[no-untyped-def]
    nodes = data[0]
    an = analyze(nodes, ci="bootstrap")  # the report's default: bounded CIs
    pairs = {
        "per_teacher.csv": an.teachers.table,
        "pairwise.csv": an.teachers.pairwise,
        "correct_vs_incorrect.csv": an.questions.tests,
        "per_question.csv": an.questions.table,
        "per_path.csv": an.paths,
        "correlations.csv": an.correlations.summary,
    }
    for name, expected in pairs.items():
        got = pd.read_csv(report / name)
        assert list(got.columns) == list(expected.columns), name
        for col in expected.columns:
            e = expected[col].to_numpy()
            if np.issubdtype(np.asarray(e).dtype, np.number):
                np.testing.assert_allclose(
                    got[col].to_numpy(dtype=float), e.astype(float), rtol=1e-12, equal_nan=True, err_msg=f"{name}:{col}"
                )
            else:
                assert [str(x) for x in got[col]] == [str(x) for x in e], f"{name}:{col}"
    q = pd.read_csv(report / "questions.csv").set_index("question_id")
    assert q.loc["q1", "n_paths"] == 2 and q.loc["q1", "n_correct_paths"] == 1
    pm = an.paths.groupby(["question_id", "teacher"])["mean"].mean()
    assert q.loc["q2", "align[self-1C]"] == pytest.approx(pm[("q2", "self-1C")])


def _md_table(md: str, title: str) -> list[dict[str, str]]:
    """Rows of the Markdown table under ``## title`` as dicts header -> cell."""
    sec = md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(headers, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_summary_md_numbers(report: Path, data) -> None:  # type: ignore[no-untyped-def]
    md = (report / "summary.md").read_text(encoding="utf-8")
    an = analyze(data[0], ci="bootstrap")
    rows = {r["teacher"]: r for r in _md_table(md, "Alignment per teacher")}
    assert set(rows) == set(TEACHERS)
    for r in an.teachers.table.itertuples():
        got = rows[r.teacher]
        assert float(got["mean"]) == pytest.approx(r.mean, abs=5e-4)
        lo, hi = (float(x) for x in re.findall(r"-?\d+\.\d+", got["95% CI"]))
        assert lo == pytest.approx(r.ci_low, abs=5e-4) and hi == pytest.approx(r.ci_high, abs=5e-4)
        assert got["95% CI"] == fmt_ci(r.ci_low, r.ci_high)
        assert int(got["paths"]) == r.n_paths == 4 and int(got["nodes"]) == r.n_nodes
        assert got["% > 0"] == f"{100 * r.frac_pos:.1f}%"
        assert float(got["weighted"]) == pytest.approx(r.weighted_mean, abs=5e-4)

    cvi = {r["teacher"]: r for r in _md_table(md, "Correct vs incorrect paths")}
    for r in an.questions.tests.itertuples():
        got = cvi[r.teacher]
        assert int(got["questions"]) == r.n == 2
        assert float(got["diff"]) == pytest.approx(r.mean_diff, abs=5e-4)
        assert got["p (t)"] == fmt_p(r.t_p) and got["p (Wilcoxon)"] == fmt_p(r.wilcoxon_p)

    pw = _md_table(md, "Teacher comparisons")
    assert len(pw) == 1
    r = an.teachers.pairwise.iloc[0]
    assert (pw[0]["teacher A"], pw[0]["teacher B"]) == (r.teacher_a, r.teacher_b)
    assert pw[0]["p (paired t, Holm)"] == fmt_p(r.t_p_holm) and pw[0]["paths"] == str(r.n_pairs)
    assert pw[0]["significant"] == ("yes" if r.significant else "no")

    corr = _md_table(md, "Alignment vs divergences and depth")
    s = an.correlations.summary
    assert len(corr) == len(s) == 2 * len(DIVERGENCE_COLUMNS)
    for got, r in zip(corr, s.itertuples()):
        assert (got["teacher"], got["variable"]) == (r.teacher, r.variable)
        assert got["Pearson"] == fmt(r.pearson_mean, signed=True)
        assert got["Spearman"] == fmt(r.spearman_mean, signed=True)

    qs = {r["question"]: r for r in _md_table(md, "Questions")}
    assert qs["q1"]["success"] == "0.625" and qs["q2"]["paths (correct)"] == "2 (1)"
    # every explained section and every figure is referenced
    for name in FIGURE_FILES.values():
        assert f"(figures/{name})" in md
    assert "(figures/extra_0.png)" in md and "training loss" in md


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


class _TokenParser(HTMLParser):
    """Collects token spans per (teacher, question, path), with colour, text and tooltip."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.teacher: str | None = None
        self.question: str | None = None
        self.path: int | None = None
        self.depth = 0  # nesting inside a token span
        self.tokens: dict[tuple[str, str, int], list[dict[str, str]]] = {}
        self.scripts = 0
        self.hidden: dict[str, bool] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        cls = a.get("class") or ""
        if tag == "div" and cls == "teacher-view":
            self.teacher = a.get("data-teacher") or ""
            self.hidden[self.teacher] = "hidden" in a
        if tag == "div" and cls == "path":
            self.question, self.path = a["data-question"], int(a["data-path"] or -1)
        if tag == "span":
            if self.depth:
                self.depth += 1
            elif cls.split()[:1] == ["tok"]:
                key = (self.teacher, self.question, self.path)
                style = a.get("style") or ""
                self.tokens.setdefault(key, []).append(  # type: ignore[arg-type]
                    {"cls": cls, "color": style.split("background:")[1], "text": "", "tip": a.get("data-tip") or ""}
                )
                self.depth = 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            key = (self.teacher, self.question, self.path)
            self.tokens[key][-1]["text"] += data  # type: ignore[index]


def _shown(tok: str) -> str:
    """What the page shows for a token (markers included, tags stripped)."""
    if tok == "":
        return "∅"
    return tok.replace("\n", "↵\n").replace("\t", "→\t")


def test_html_tokens_in_order_with_colours(report: Path, data) -> None:  # type: ignore[no-untyped-def]
    page = (report / "index.html").read_text(encoding="utf-8")
    p = _TokenParser()
    p.feed(page)
    assert set(p.hidden) == set(TEACHERS)
    assert p.hidden == {"ext-4B": False, "self-1C": True}  # first teacher shown
    nodes = data[0]
    for teacher in TEACHERS:
        for (q, path), toks in TOKENS.items():
            spans = p.tokens[(teacher, q, path)]
            assert [s["text"] for s in spans] == [_shown(t) for t in toks]
            sub = nodes[(nodes.teacher == teacher) & (nodes.question_id == q) & (nodes.path_id == path)].sort_values(
                "node"
            )
            for s, a in zip(spans, sub.align_gkd):
                assert s["color"] == alignment_color(a)
                assert ("inv" in s["cls"].split()) == math.isnan(a)
    first = p.tokens[("ext-4B", "q1", 0)]
    assert [s["color"] for s in first[:4]] == ["#1a9850", "#d73027", GREY, "#ffffff"]
    tip = first[0]["tip"]
    assert "align_gkd = +1.000" in tip and "P_student = 0.250" in tip
    assert "P_teacher = 0.500" in tip and "P_succ = 0.750" in tip
    assert "teacher adv = +0.125" in tip and "visits = 20" in tip and "KL = 0.3000" in tip
    assert "\n" in tip  # one quantity per line
    assert "invalid node" in first[2]["tip"] and "P_succ = n/a" in first[2]["tip"]


def test_html_is_escaped_and_self_contained(report: Path) -> None:
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert " &lt;b&gt;" in page and " <b>" not in page
    p = _TokenParser()
    p.feed(page)
    assert p.scripts == 1  # only the inline teacher selector
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page
    assert page.count("data:image/png;base64,") == len(FIGURE_FILES) + 1
    extra = base64.b64encode((report / "figures" / "extra_0.png").read_bytes()).decode()
    assert extra in page
    assert "id='teacher-select'" in page
    for t in TEACHERS:
        assert f"<option value='{t}'>" in page
    assert "linear-gradient" in page  # legend


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_the_report_leads_with_the_answer(report: Path) -> None:
    """The answer (teachers ranked with their intervals, correct vs incorrect) and its two figures
    come before any table; definitions, notes and the choices are folded; the rest follows."""
    md = (report / "summary.md").read_text(encoding="utf-8")
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert heads[:2] == ["## The answer", "## About this run"]
    answer = md[md.index("## The answer") : md.index("## About this run")]
    assert "- highest alignment: " in answer and "95% CI" in answer and "correct vs incorrect paths" in answer
    assert answer.index("teacher_means.png") < answer.index("correct_vs_incorrect.png")
    html = (report / "index.html").read_text(encoding="utf-8")
    first_table = html.index("<table")
    assert html.index("id='answer'") < html.index("highest alignment") < first_table
    assert html.index("<figure") < first_table  # the answer's figures before the tables
    about = html[html.index("<details id='about'>") : html.index("</details>", html.index("<details id='about'>"))]
    assert "alignment metric" in about and "<table" not in about
    assert html.count("<img") == 6  # 2 with the answer, 3 after the tables, the extra figure


def test_figures_are_valid_pngs(report: Path) -> None:
    for name in FIGURE_FILES.values():
        f = report / "figures" / name
        w, h = _png_size(f)
        assert w >= 300 and h >= 200, name
        assert f.stat().st_size > 8_000, name


# --------------------------------------------------------------------------------------------
# options and errors
# --------------------------------------------------------------------------------------------


def test_truncation_options(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    nodes, questions, paths = data
    write_report(tmp_path, nodes, questions, paths, max_questions=1, max_tokens=2, ci="bootstrap")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    p = _TokenParser()
    p.feed(page)
    assert {k[1] for k in p.tokens} == {"q1"}
    assert all(len(v) == 2 for v in p.tokens.values())
    assert "Showing 1 of 2 questions" in page and "more tokens not shown" in page
    assert (pd.read_csv(tmp_path / "per_teacher.csv")["ci_method"] == "bootstrap").all()


def test_report_errors(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    nodes, questions, paths = data
    with pytest.raises(OpdlensError, match="questions table lacks.*success_rate"):
        write_report(tmp_path, nodes, questions.drop(columns="success_rate"), paths)
    with pytest.raises(OpdlensError, match="paths table lacks"):
        write_report(tmp_path, nodes, questions, paths.drop(columns="text"))
    with pytest.raises(OpdlensError, match="does not exist"):
        write_report(tmp_path, nodes, questions, paths, extra=[("x", tmp_path / "nope.png")])
    with pytest.raises(OpdlensError, match="min_visits"):
        write_report(tmp_path, nodes.assign(valid=False), questions, paths)


# --------------------------------------------------------------------------------------------
# what a reader needs not to misread the report
# --------------------------------------------------------------------------------------------


def _node(teacher: str, q: str, p: int, u: int, a: float, n_children: int, w: float, **kw: object) -> dict:
    return {
        "question_id": q,
        "path_id": p,
        "path_correct": p == 0,
        "teacher": teacher,
        "node": u,
        "depth_norm": u / 2,
        "token_id": 7 + u,
        "token_text": f"t{u}",
        "valid": True,
        "n_children": n_children,
        "visits": 30,
        "p_student": 0.25,
        "p_teacher": 0.5,
        "psucc_token": 0.5,
        "teacher_adv": 0.1,
        "align_gkd": a,
        "align_single": a,
        "align_minillm": a,
        "align_drgrpo": a,
        "norm_ideal": w,
        "norm_gkd": 0.5,
        "kl": 0.1 * (u + 1),
        "js": 0.01 * (p + 1),
        "l2": 0.2 + 0.1 * u,
        "cos_prob": 0.9 - 0.1 * p,
        **kw,
    }


@pytest.fixture(scope="module")
def misreadable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Teacher T: path means > 0 from +1 two-child nodes, weighted mean < 0 from heavy 3-child
    nodes; teacher U: path means +1, +1, +1, -1 (a t-interval would reach past +1)."""
    keys = [("q1", 0), ("q1", 1), ("q2", 0), ("q2", 1)]
    deep = [-0.5, -0.9, -0.2, -0.99]
    rows = []
    for (q, p), d in zip(keys, deep):
        rows.append(_node("T", q, p, 0, 1.0, 2, 0.1))
        rows.append(_node("T", q, p, 1, d, 3, 10.0))
    for (q, p), a in zip(keys, [1.0, 1.0, 1.0, -1.0]):
        rows.append(_node("U", q, p, 0, a, 2, 1.0))
        rows.append(_node("U", q, p, 1, NAN, 1, 1.0, valid=False))
    nodes = pd.DataFrame(rows)
    children = [
        {"token": 7, "text": "t0", "p_student": 0.25, "p_teacher": 0.5, "psucc": 0.75, "visits": 30},
        {"token": 9, "text": "<alt>", "p_student": 0.125, "p_teacher": 0.0625, "psucc": 0.25, "visits": 21},
    ]
    nodes["children"] = __import__("json").dumps(children)
    questions = pd.DataFrame(
        {"question_id": ["q1", "q2"], "n_rollouts": [8, 8], "success_rate": [0.5, 0.25], "n_targeted": [4, 4]}
    )
    paths = pd.DataFrame(
        [{"question_id": q, "path_id": p, "correct": p == 0, "length": 2, "text": "t0t1"} for q, p in keys]
    )
    skips = pd.DataFrame(
        {
            "question_id": ["q3", "q1"],
            "teacher": ["", "U"],
            "reason": ["prompt too long", "no correct rollout to show the teacher"],
        }
    )
    inputs = pd.DataFrame(
        {"question_id": ["q1", "q2"], "question_text": ["What is <b>2+2</b>?", "Is 7 prime?"], "gold": ["4", "True"]}
    )
    out = tmp_path_factory.mktemp("misreadable")
    write_report(out, nodes, questions, paths, skips=skips, inputs=inputs, notes=["PARTIAL RUN: test"], n_boot=2000)
    return out, nodes


def test_intervals_stay_inside_the_metric_bounds(misreadable) -> None:  # type: ignore[no-untyped-def]
    out, nodes = misreadable
    pt = pd.read_csv(out / "per_teacher.csv").set_index("teacher")
    assert t_interval([1.0, 1.0, 1.0, -1.0])[1] > 1.0  # what the report no longer shows
    assert (pt["ci_method"] == "bootstrap").all()
    assert (pt["ci_low"] >= -1.0).all() and (pt["ci_high"] <= 1.0).all()
    assert pt.loc["U", "ci_high"] == 1.0 and pt.loc["U", "ci_low"] < 0.5


def test_two_child_share_and_sign_disagreement_are_stated(misreadable) -> None:  # type: ignore[no-untyped-def]
    out, _ = misreadable
    md = (out / "summary.md").read_text(encoding="utf-8")
    rows = {r["teacher"]: r for r in _md_table(md, "Alignment per teacher")}
    assert rows["T"]["2-child"] == "50.0%" and rows["U"]["2-child"] == "100.0%"
    assert rows["T"]["mean (3+)"] == fmt(np.mean([-0.5, -0.9, -0.2, -0.99]), signed=True)
    assert rows["T"]["nodes (3+)"] == "4" and rows["U"]["mean (3+)"] == "–" and rows["U"]["nodes (3+)"] == "0"
    assert float(rows["T"]["mean"]) > 0 > float(rows["T"]["weighted"])
    # said once, with the answer
    assert md.count("T: the mean (+0.176) and the weighted mean (-0.631) disagree in sign") == 1
    assert md.index("- note: T: the mean (+0.176)") < md.index("## About this run")
    assert "U: the mean" not in md
    assert "8 of 12 valid node(s) (66.7%) have exactly two well-visited children" in md
    assert md.splitlines()[2:5] == ["## The answer", "", "- PARTIAL RUN: test"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count("disagree in sign") == 1


def test_skips_question_text_gold_and_children_are_shown(misreadable) -> None:  # type: ignore[no-untyped-def]
    out, _ = misreadable
    md = (out / "summary.md").read_text(encoding="utf-8")
    skipped = _md_table(md, "Skipped")
    assert [(r["question"], r["teacher"], r["reason"]) for r in skipped] == [
        ("q3", "(all)", "prompt too long"),
        ("q1", "U", "no correct rollout to show the teacher"),
    ]
    assert "2 skip(s) (1 whole question(s))" in md
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<pre class='qtext'>What is &lt;b&gt;2+2&lt;/b&gt;?</pre><b>gold answer:</b> <code>4</code>" in page
    p = _TokenParser()
    p.feed(page)
    tip = p.tokens[("T", "q1", 0)][0]["tip"]
    assert "(2 children: the cosine is ±1 at any P_succ, only its sign informs; shown: the sign (plug-in) or " in tip
    lines = tip.splitlines()
    i = lines.index("children in S_u:  P_θ      P_te     P_succ  visits")
    assert lines[i + 1].split() == ["'t0'", "0.250", "0.500", "0.75", "30"]
    assert lines[i + 2].split() == ["'<alt>'", "0.125", "0.062", "0.25", "21"]


def test_children_column_matches_the_path_statistics() -> None:
    import json

    import torch

    from opdlens.diagnose.children import children_column
    from opdlens.diagnose.tree import RolloutSet, path_stats

    rng = np.random.default_rng(0)
    rollouts = RolloutSet.from_lists(
        [rng.integers(0, 5, size=rng.integers(1, 6)) for _ in range(400)], rng.random(400) < 0.5
    )
    path = [1, 2, 3, 4]
    st = path_stats(path, rollouts)
    lps = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    lpt = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    col = children_column(st, lps, lpt, lambda toks: [f"<{t}>" for t in toks], min_visits=3, limit=3)
    assert len(col) == 4
    for u, cell in enumerate(col):
        toks, n, s = st.children(u)
        want = sorted(((int(-v), int(k)) for k, v in zip(toks, n) if v >= 3))[:3]
        got = json.loads(cell)
        assert [(c["visits"], c["token"]) for c in got] == [(-v, k) for v, k in want]
        for c in got:
            i = list(toks).index(c["token"])
            assert c["psucc"] == pytest.approx(s[i] / n[i], abs=1e-6) and c["text"] == f"<{c['token']}>"
            assert c["p_student"] == pytest.approx(math.exp(lps[u, c["token"]]), abs=1e-6)
            assert c["p_teacher"] == pytest.approx(math.exp(lpt[u, c["token"]]), abs=1e-6)
    assert any(json.loads(c) for c in col)


# --------------------------------------------------------------------------------------------
# issue 27: shared questions, the run's unit, weighted test, pooled figures, budget, choices
# --------------------------------------------------------------------------------------------

SHARED_ALIGN = {  # (teacher, question, path) -> node alignments (weights 1, 3 for nodes 0, 1)
    ("A", "q1", 0): [0.8, 0.2],
    ("A", "q1", 1): [-0.4, 0.6],
    ("A", "q2", 0): [0.9, 0.9],
    ("A", "q2", 1): [0.9, 0.7],
    ("A", "q3", 0): [0.3, -0.1],
    ("A", "q3", 1): [0.5, 0.7],
    ("B", "q1", 0): [-0.2, 0.4],
    ("B", "q1", 1): [0.6, 0.0],
    ("B", "q3", 0): [0.1, 0.1],
    ("B", "q3", 1): [-0.5, 0.3],
}  # B was skipped on q2 (its context did not fit its model)
TOO_LONG = "teacher context of 900 tokens + path of 200 tokens exceeds the teacher's context of 1024 tokens"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from opdlens.diagnose.config import DiagnoseConfig

    rows = [
        _node(t, q, p, u, a, 3, 1.0 + 2 * u) for (t, q, p), aligns in SHARED_ALIGN.items() for u, a in enumerate(aligns)
    ]
    nodes = pd.DataFrame(rows)
    questions = pd.DataFrame(
        {
            "question_id": ["q1", "q2", "q3"],
            "n_rollouts": [64] * 3,
            "success_rate": [0.5, 0.25, 0.75],
            "n_targeted": [48_000, 61_500, 52_300],
        }
    )
    paths = pd.DataFrame(
        [
            {"question_id": q, "path_id": p, "correct": p == 0, "length": 2, "text": "t0t1"}
            for q in ("q1", "q2", "q3")
            for p in (0, 1)
        ]
    )
    skips = pd.DataFrame({"question_id": ["q2"], "teacher": ["B"], "action": ["skipped"], "reason": [TOO_LONG]})
    choices = run_choices(DiagnoseConfig(protocol="paper"), used_only=True)
    out = {}
    for unit in ("question", "path"):
        d = tmp_path_factory.mktemp(f"shared-{unit}")
        write_report(d, nodes, questions, paths, skips=skips, unit=unit, choices=choices, n_boot=500)  # type: ignore[arg-type]
        out[unit] = d
    return out, choices


def _path_value(aligns: list[float], weighted: bool) -> float:
    w = np.array([1.0, 3.0]) * 0.5  # norm_ideal (1, 3) x norm_gkd 0.5
    return float((w * aligns).sum() / w.sum()) if weighted else float(np.mean(aligns))


def test_table1_is_over_the_questions_every_teacher_shares(shared_run) -> None:  # type: ignore[no-untyped-def]
    runs, _ = shared_run
    md = (runs["question"] / "summary.md").read_text(encoding="utf-8")
    rows = {r["teacher"]: r for r in _md_table(md, "Alignment per teacher")}
    pt = pd.read_csv(runs["question"] / "per_teacher.csv").set_index("teacher")
    t1 = pd.read_csv(runs["question"] / "table1.csv").set_index(["teacher", "statistic", "group"])
    for teacher in ("A", "B"):
        # by hand: path means, question means over q1 and q3 (B has no q2), teacher mean
        q_means = [np.mean([np.mean(SHARED_ALIGN[(teacher, q, p)]) for p in (0, 1)]) for q in ("q1", "q3")]
        assert pt.loc[teacher, "mean"] == pytest.approx(np.mean(q_means))
        assert t1.loc[(teacher, "mean", "all"), "value"] == pytest.approx(np.mean(q_means))
        assert t1.loc[(teacher, "mean", "all"), "n_questions"] == 2
        assert rows[teacher]["questions"] == "2"
    # A's own mean over its three questions would differ: q2 is really left out
    own = np.mean([np.mean([np.mean(SHARED_ALIGN[("A", q, p)]) for p in (0, 1)]) for q in ("q1", "q2", "q3")])
    assert abs(own - pt.loc["A", "mean"]) > 0.05
    assert rows["A"]["scored"] == "3" and rows["B"]["scored"] == "2"
    assert "Table 1 is over the 2 question(s) all 2 teachers share" in md
    left = _md_table(md, "Questions left out of Table 1")
    assert [(r["question"], r["missing for"], r["reason"]) for r in left] == [("q2", "B", TOO_LONG)]
    # the context that did not fit is counted per teacher
    assert "context longer than the teacher model's window (question skipped for that teacher): B 1." in md
    assert {r["teacher"]: (r["skipped"], r["too long"]) for r in _md_table(md, "Skips per teacher")} == {
        "A": ("0", "0"),
        "B": ("1", "1"),
    }


def test_ci_captions_name_the_runs_unit(shared_run) -> None:  # type: ignore[no-untyped-def]
    runs, _ = shared_run
    for unit, means in (
        ("question", "question means (statistical unit: the question)"),
        ("path", "path means, each weighted 1 / paths of its question (statistical unit: the path)"),
    ):
        md = (runs[unit] / "summary.md").read_text(encoding="utf-8")
        answer = md.split("## The answer", 1)[1].split("## About this run", 1)[0]
        assert answer.count(f"CI over {means}") == 2  # the teacher means and the correct-vs-incorrect figures
        assert f"95% CI: percentile bootstrap (stays inside [-1, 1]) over {means}" in md
        if unit == "question":
            assert "over path means" not in md


def test_weighted_correct_vs_incorrect_and_pooled_nodes_are_shown(shared_run) -> None:  # type: ignore[no-untyped-def]
    runs, _ = shared_run
    md = (runs["question"] / "summary.md").read_text(encoding="utf-8")
    got = {r["teacher"]: r for r in _md_table(md, "Correct vs incorrect paths, weighted cosine")}
    for teacher, qs in (("A", ("q1", "q2", "q3")), ("B", ("q1", "q3"))):
        c = np.array([_path_value(SHARED_ALIGN[(teacher, q, 0)], True) for q in qs])
        i = np.array([_path_value(SHARED_ALIGN[(teacher, q, 1)], True) for q in qs])
        r = got[teacher]
        assert r["questions"] == str(len(qs))
        assert r["correct"] == fmt(c.mean()) and r["incorrect"] == fmt(i.mean())
        assert r["diff"] == fmt((c - i).mean(), signed=True)
        assert r["p (t)"] == fmt_p(stats.ttest_rel(c, i).pvalue)
    csv = pd.read_csv(runs["question"] / "correct_vs_incorrect_weighted.csv").set_index("teacher")
    assert csv.loc["B", "n"] == 2
    # the paper's pooled figures: every valid node, per teacher and over all
    pooled = {r["teacher"]: r for r in _md_table(md, "Pooled node alignments")}
    by_teacher = {t: np.concatenate([a for (tt, _, _), a in SHARED_ALIGN.items() if tt == t]) for t in ("A", "B")}
    everything = np.concatenate(list(by_teacher.values()))
    for name, x in (*by_teacher.items(), ("(all teachers)", everything)):
        r = pooled[name]
        assert r["valid nodes"] == str(x.size) and r["mean"] == fmt(x.mean(), signed=True)
        assert r["std"] == fmt(x.std(ddof=1)) and r["% > 0"] == f"{100 * np.mean(x > 0):.1f}%"
    assert "(figures/alignment_pooled.png)" in md
    w, h = _png_size(runs["question"] / "figures" / "alignment_pooled.png")
    assert w >= 300 and h >= 200


def test_targeted_rollouts_and_choices_are_shown(shared_run) -> None:  # type: ignore[no-untyped-def]
    from opdlens.diagnose.choices import CHOICES, CHOICES_BY_LABEL

    runs, choices = shared_run
    md = (runs["question"] / "summary.md").read_text(encoding="utf-8")
    total = 48_000 + 61_500 + 52_300
    line = f"targeted rollouts: {total:,} in all over 3 question(s); per question 48,000-61,500 (mean {total / 3:,.0f})"
    assert line in md
    assert [r["targeted"] for r in _md_table(md, "Questions")] == ["48000", "61500", "52300"]
    section = md.split("## Choices of this run\n", 1)[1].split("\n## ", 1)[0]
    assert "- protocol: `paper`" in section
    for label, value in choices.items():
        if label == "protocol":
            continue
        c = CHOICES_BY_LABEL[label]
        shown = "null" if value is None else str(value)
        assert f"- {label}: `{shown}` (`{c.key}`; protocol: paper → " in section
        assert f"; {c.provenance}: {c.source})" in section
    unused = [c.label for c in CHOICES if c.label not in choices]
    assert unused and f"not used by this run (or not given): {', '.join(unused)}." in section
    page = (runs["question"] / "index.html").read_text(encoding="utf-8")
    assert "id='tbl-choices'" in page.replace('"', "'")
