"""A self-contained HTML page of a comparison: the metrics table, each run's loss curves (inline SVG) and every
prompt's answers side by side, the words that differ from the reference (or from the first model) highlighted.
No server, no network: styles, script and figures are inside the one file."""

from __future__ import annotations

import difflib
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import ConfigError, LorakitError
from .compare import Comparison, field_table
from .metrics import reference_text

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#e8f5e9}
.answers td{white-space:pre-wrap;max-width:36em}
mark{background:#ffe08a}
.ok{color:#1b5e20}.bad{color:#b71c1c}
tr.same{display:none}body.all tr.same{display:table-row}
.meta{color:#666}
"""
SCRIPT = "function toggleSame(box){document.body.classList.toggle('all', box.checked)}"
GENERATOR = '<meta name="generator" content="lorakit eval">'  # how a later --report knows the file is one of ours


def check_report_target(target: str | Path, *, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, a --report path that cannot be written or would replace something that is not an
    earlier lorakit report (an input file, a directory, anything else a user made)."""
    path = Path(target)
    where = "--report"
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name, e.g. {path / 'report.html'}", where=where)
    if any(path.resolve() == Path(other).resolve() for other in inputs):
        raise ConfigError(f"{path} is one of this command's inputs; write the report elsewhere", where=where)
    if path.exists():
        try:
            head = path.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError as err:
            raise ConfigError(f"{path} exists and cannot be read ({err.strerror}); choose another path",
                              where=where) from None
        if GENERATOR not in head:
            raise ConfigError(f"{path} exists and is not a lorakit eval report; it is never replaced: choose another "
                              "path, or move it away", where=where)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the directory {parent} ({err.strerror})", where=where) from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write into {parent} (permission denied); choose another path", where=where)


def write_report(comparison: Comparison, target: str | Path, *, title: str, settings: Mapping[str, str],
                 runs: Mapping[str, Sequence[dict]] = {}) -> Path:
    """Write the page to `target` atomically. `runs`: a run's name -> its metrics.jsonl rows (loss curves)."""
    body = [f"<h1>{_e(title)}</h1>",
            "<p class=meta>" + " · ".join(f"{_e(k)}: {_e(v)}" for k, v in settings.items()) + "</p>",
            "<h2>Metrics</h2>", _metrics_table(comparison)]
    if comparison.loss_note:
        body.append(f"<p class=meta>loss: {_e(comparison.loss_note)}</p>")
    fields = field_table(comparison)
    if fields:
        body.append(f"<pre>{_e(fields)}</pre>")
    if comparison.errors:
        body.append("<h3>Not scored</h3><ul>" + "".join(f"<li>{_e(e)}</li>" for e in comparison.errors) + "</ul>")
    for name, rows in runs.items():
        svg = _loss_svg(rows)
        if svg:
            body.append(f"<h2>Training curves: {_e(name)}</h2>{svg}")
    if len(comparison.models) > 1:
        differ = set(comparison.differing())
        body.append(f"<h2>Answers</h2><p>{len(differ)} of {len(comparison.examples)} prompts answered differently. "
                    "<label><input type=checkbox onchange='toggleSame(this)'> show the prompts every model answered "
                    "the same</label></p>")
    else:  # one model: nothing to tell apart, every answer shown
        differ = set(range(len(comparison.examples)))
        body.append("<h2>Answers</h2>")
    body.append(_answers_table(comparison, differ))
    page = (f"<!doctype html><html><head><meta charset=utf-8>{GENERATOR}<title>{_e(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>{''.join(body)}</body></html>\n")
    try:
        write_text_atomic(target, page)
    except OSError as err:
        raise LorakitError(f"--report {target}: could not write it ({err.strerror or err})") from None
    return Path(target)


def _metrics_table(comparison: Comparison) -> str:
    columns = [(metric, lambda m, k=metric: m.mean(k), max) for metric in comparison.metrics]
    if any(m.loss is not None for m in comparison.models):
        columns.append(("loss", lambda m: m.loss, min))
    head = "<tr><th>model</th>" + "".join(f"<th>{_e(name)}</th>" for name, _, _ in columns) + "</tr>"
    best = {}
    for name, value, pick in columns:
        values = [v for v in (value(m) for m in comparison.models) if v is not None and math.isfinite(v)]
        best[name] = pick(values) if len(values) > 1 else None
    rows = []
    for model in comparison.models:
        cells = []
        for name, value, _ in columns:
            v = value(model)
            shown = "-" if v is None or not math.isfinite(v) else f"{v:.4f}"
            mark = " best" if best[name] is not None and v == best[name] else ""
            cells.append(f"<td class='num{mark}'>{shown}</td>")
        title = f" title='{_e(model.path)}'" if model.path else ""
        rows.append(f"<tr><td{title}>{_e(model.name)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _answers_table(comparison: Comparison, differ: set[int]) -> str:
    has_reference = any(ex.reference is not None for ex in comparison.examples)
    head = ("<tr><th>prompt</th>" + ("<th>reference</th>" if has_reference else "")
            + "".join(f"<th>{_e(m.name)}</th>" for m in comparison.models) + "</tr>")
    rows = []
    for i, example in enumerate(comparison.examples):
        against = (reference_text(example.reference) if example.reference is not None
                   else comparison.models[0].answers[i].text)
        cells = [f"<td><span class=meta>{_e(example.location)}</span>\n{_e(example.prompt)}</td>"]
        if has_reference:
            cells.append(f"<td>{_e('' if example.reference is None else reference_text(example.reference))}</td>")
        for model in comparison.models:
            scores = " ".join(f"<span class={'ok' if model.scores[k][i] == 1 else 'bad'}>{_e(k)} "
                              f"{model.scores[k][i]:.2f}</span>" for k in comparison.metrics
                              if math.isfinite(model.scores[k][i]))
            answer = model.answers[i]
            cut = " <span class=meta>[cut at max tokens]</span>" if answer.finish_reason == "length" else ""
            cells.append(f"<td>{highlight(answer.text, against)}{cut}\n<span class=meta>{scores}</span></td>")
        rows.append(f"<tr class={'differ' if i in differ else 'same'}>{''.join(cells)}</tr>")
    return f"<table class=answers>{head}{''.join(rows)}</table>"


def highlight(text: str, against: str) -> str:
    """`text` escaped, with the words that are not in `against` (a word-level diff) inside <mark>."""
    words, other = text.split(" "), against.split(" ")
    out = []
    for op, a1, a2, _, _ in difflib.SequenceMatcher(a=words, b=other, autojunk=False).get_opcodes():
        chunk = _e(" ".join(words[a1:a2]))
        if a1 == a2:
            continue
        out.append(chunk if op == "equal" else f"<mark>{chunk}</mark>")
    return " ".join(out)


def _loss_svg(rows: Sequence[dict]) -> str:
    """Train and validation loss against step as inline SVG (matplotlib), or "" where the run logged none."""
    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]

    train, val = series("loss"), series("eval_loss")
    if not train and not val:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # no timestamp: same run, same page
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the page is HTML


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
