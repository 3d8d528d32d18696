"""A report as a list of blocks (headings, paragraphs, bullets, tables, images), rendered once to
Markdown and once to a self-contained HTML page.

The HTML page embeds every image as a base64 data URI and carries its CSS inline: it opens from a
mail attachment or a copied file, with no network and no JavaScript. `parse_markdown` reads back
the small subset of Markdown that `tomtit simulate` writes, so its report gets the same page."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str  # `backticks` become code; nothing else is markup


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report's folder
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append(_md_row(b.header))
            out.append("|" + "---|" * len(b.header))
            out += [_md_row(r) for r in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.path})", ""]
    return "\n".join(out)


def _md_row(cells: tuple[str, ...]) -> str:
    # A "|" inside a cell would split it; a newline would end the table.
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
.missing { color: #a00; }
"""


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    """The page; images are read from `folder` and embedded (a missing one is named, not fatal)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 6)
            body.append(f"<h{level}>{_inline(b.text)}</h{level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            body.append(_figure(folder, b))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _figure(folder: Path, image: Image) -> str:
    try:
        data = (folder / image.path).read_bytes()
    except OSError:
        return f'<p class="missing">plot missing: {html.escape(image.path)}</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = html.escape(image.alt, quote=True)
    return (f'<figure><img src="{uri}" alt="{alt}">'
            f"<figcaption>{html.escape(image.path)}</figcaption></figure>")


def _inline(text: str) -> str:
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<path>[^)]+)\)$")


def parse_markdown(md: str) -> list[Block]:
    """Blocks from the Markdown subset the simulate report uses: `#` headings, pipe tables,
    `- ` bullets, `![alt](path)` images on their own line, and paragraphs."""
    blocks: list[Block] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            blocks.append(Heading(m.group(2), len(m.group(1))))
            i += 1
        elif m := _IMAGE.match(line):
            blocks.append(Image(m.group("path"), m.group("alt")))
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_md_cells(lines[i].strip()))
                i += 1
            body = [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            blocks.append(Table(tuple(rows[0]), tuple(tuple(r) for r in body)))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(lines[i].strip()[2:])
                i += 1
            blocks.append(Bullets(tuple(items)))
        else:
            text = [line]  # taken whatever it starts with: every line must move `i` on
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines[i].strip()):
                text.append(lines[i].strip())
                i += 1
            blocks.append(Paragraph(" ".join(text)))
    return blocks


def _starts_block(line: str) -> bool:
    return bool(re.match(r"^#{1,6}\s", line) or line.startswith(("|", "- ")) or _IMAGE.match(line))


def _md_cells(row: str) -> list[str]:
    inner = row.strip()[1:]
    if inner.endswith("|") and not inner.endswith("\\|"):
        inner = inner[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]
