"""A report page: sections of text, tables and figures, written as one self-contained HTML file and a
Markdown twin.

The HTML embeds every figure as a base64 PNG and its style inline, so it opens offline, can be mailed
or attached to an issue, and loads nothing from the network (no scripts, fonts or stylesheets). The
Markdown twin references the same PNGs, which sit in ``figures/`` beside it.
"""

from __future__ import annotations

import base64
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.files import write_atomic
from qkvlab.render.tables import markdown_table

__all__ = [
    "Figure",
    "Markdown",
    "Page",
    "Preformatted",
    "Section",
    "Table",
    "Text",
    "inert_markdown",
    "table_markdown",
    "write_html",
    "write_markdown",
]


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (``code`` in backticks is kept as code)."""

    text: str


@dataclass(frozen=True)
class Markdown:
    """Markdown that qkvlab already prints (the repro tables go into REPRODUCTION.md as printed)."""

    text: str


@dataclass(frozen=True)
class Preformatted:
    """Text whose layout matters: a terminal table, a config, a command."""

    text: str
    caption: str = ""


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[object]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str = ""


Block = Text | Markdown | Preformatted | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


@dataclass
class Page:
    title: str
    sections: list[Section]
    subtitle: str = ""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.subtitle{color:#666;margin-top:0}
nav ol{columns:2;font-size:.95em}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
caption{caption-side:top;text-align:left;color:#555;padding-bottom:.3em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
code{background:#f3f3f3;padding:0 .2em}
"""


def _inline(text: str) -> str:
    """Escape ``text`` and turn `backticks` into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in table.rows
    )
    caption = f"<caption>{_inline(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Markdown):
        import markdown

        return markdown.markdown(inert_markdown(block.text), extensions=["tables"], output_format="html")
    if isinstance(block, Preformatted):
        caption = f"<p>{_inline(block.caption)}</p>" if block.caption else ""
        return f"{caption}<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, Table):
        return table_html(block)
    data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
    alt = html.escape(block.caption or Path(block.path).stem, quote=True)
    caption = f"<figcaption>{_inline(block.caption)}</figcaption>" if block.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{caption}</figure>'


def write_html(page: Page, path: Path) -> Path:
    """One file, no external resources: figures inline as data URIs, style inline."""
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in page.sections)
    body = []
    for section in page.sections:
        body.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        body += [_html_block(b) for b in section.blocks]
        body.append("</section>")
    subtitle = f'<p class="subtitle">{_inline(page.subtitle)}</p>' if page.subtitle else ""
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(page.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(page.title)}</h1>{subtitle}<nav><ol>{nav}</ol></nav>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    write_atomic(path, text)
    return path


# Markdown punctuation that could make a link or an image, code, or a new table cell out of a name;
# with a backslash before it, CommonMark shows the character itself (emphasis is left: it runs nothing)
_MD_ACTIVE = re.compile(r"([\\`\[\]|])")


def _md_escape(value: object) -> str:
    """A string from a file or a folder name, inert in Markdown: no HTML, no link, no markup."""
    return _MD_ACTIVE.sub(r"\\\1", _cell(value).replace("<", "&lt;")).replace("\n", " ")


_CODE = re.compile(r"(```.*?```|`+[^`]*`+)", re.S)


def inert_markdown(text: str) -> str:
    """Markdown that qkvlab composed around names from files: every ``<`` outside code written as
    ``&lt;``, so no raw HTML in it renders (``<img onerror=…>`` shows as text; without a ``<`` there is
    no tag); code is inert already."""
    parts = _CODE.split(text)
    return "".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def table_markdown(table: Table) -> str:
    """A :class:`Table` as a Markdown table (caption above it); every cell escaped (inert)."""
    lines = [f"{inert_markdown(table.caption)}\n"] if table.caption else []
    lines += markdown_table(
        [_md_escape(h) for h in table.headers], [[_md_escape(v) for v in row] for row in table.rows]
    )
    return "\n".join(lines)


def _md_block(block: Block, root: Path) -> str:
    if isinstance(block, Text | Markdown):
        return inert_markdown(block.text)
    if isinstance(block, Preformatted):
        caption = f"{inert_markdown(block.caption)}\n\n" if block.caption else ""
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", block.text)), default=0))
        return f"{caption}{fence}\n{block.text}\n{fence}"
    if isinstance(block, Table):
        return table_markdown(block)
    relative = Path(block.path).resolve().relative_to(root.resolve()).as_posix()
    alt = _md_escape(block.caption or Path(block.path).stem)
    target = urllib.parse.quote(relative)  # spaces, brackets and quotes in folder names stay in the path
    return f"![{alt}]({target})" + (f"\n\n*{inert_markdown(block.caption)}*" if block.caption else "")


def write_markdown(page: Page, path: Path) -> Path:
    """The same page in Markdown; figures are referenced relative to ``path``'s folder."""
    lines = [f"# {_md_escape(page.title)}", ""]
    if page.subtitle:
        lines += [inert_markdown(page.subtitle), ""]
    for section in page.sections:
        lines += [f"## {_md_escape(section.title)}", ""]
        for block in section.blocks:
            lines += [_md_block(block, path.parent), ""]
    write_atomic(path, "\n".join(lines))
    return path
