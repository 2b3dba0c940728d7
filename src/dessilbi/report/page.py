"""The one-page ``report.html``: every figure embedded, nothing fetched from the network."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dessilbi.report.run_data import RunData
from dessilbi.structure import distinct_group_names

__all__ = ["Section", "config_table", "render_page", "summary_table", "table"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
figure { margin: 1em 0; flex: 1 1 520px; max-width: 100%; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
nav a { margin-right: 1em; } table.config td:nth-child(odd) { color: #666; }
"""


@dataclass
class Section:
    """A part of the page: a heading, some text, figures (PNG and SVG files) and tables."""

    key: str
    title: str
    text: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (PNG file, caption)
    tables: list[str] = field(default_factory=list)  # rendered HTML


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    svg = png.with_suffix(".svg").name
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(caption)} (<a href="{html.escape(svg)}">SVG</a>)'
            "</figcaption></figure>")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None,
          css: str = "") -> str:
    """An HTML table of plain values (escaped)."""
    head = ("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{css}">{head}{body}</table>'


def config_table(config: dict[str, Any], columns: int = 3) -> str:
    """The configuration as ``columns`` key-value pairs per row (a long list stays short)."""
    items = list(config.items())
    per_column = -(-len(items) // columns)
    rows = []
    for r in range(per_column):
        row: list[Any] = []
        for c in range(columns):
            index = c * per_column + r
            row += list(items[index]) if index < len(items) else ["", ""]
        rows.append(row)
    return table(rows, None, "config")


def summary_table(runs: Sequence[RunData]) -> str:
    """The final figures of every run."""
    rows = []
    for run in runs:
        last = run.metrics[-1]
        sparse = last.get("test_acc_sparse")
        selected = last.get("selected") or {}
        selected = {n: selected[n] for n in distinct_group_names(selected)}
        chosen = sum(v[0] for v in selected.values())
        total = sum(v[1] for v in selected.values())
        rows.append([run.label, run.config.get("optimizer"), last["epoch"],
                     f"{last['test_acc']:.2f}", "–" if sparse is None else f"{sparse:.2f}",
                     f"{chosen} / {total}" if total else "–", f"{last['train_loss']:.4f}"])
    return table(rows, ["run", "optimizer", "epochs", "test acc W (%)", "test acc W̃ (%)",
                        "selected groups", "train loss"])


def render_page(title: str, sections: Sequence[Section]) -> str:
    """The whole page, with a table of contents."""
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>"]
    for s in sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        parts.extend(s.tables)
        if s.figures:
            parts.append('<div class="figures">')
            parts.extend(_figure(png, caption) for png, caption in s.figures)
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
