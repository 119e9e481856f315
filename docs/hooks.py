"""mkdocs hook: pages generated from the code, so they cannot drift from it.

``<!-- recipe-keys -->`` in a page becomes the table of every recipe key in
``headsurgeon.recipe.key_docs()`` with its default, allowed values and meaning.

Help texts write placeholders as ``<recipe>``, ``<N>``: outside code, markdown would pass them on
as HTML tags, which a browser hides. They are escaped in the recipe table, and in the CLI page that
mkdocs-click renders from the click help (after this hook's markdown stage, so in its HTML).
"""
from __future__ import annotations

import html
import json
import re

MARKER = "<!-- recipe-keys -->"
CLI_PAGE = "reference/cli.md"
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>`]*>")


def _escape_placeholders(text: str) -> str:
    """``runs/<recipe>-<time>`` as text: escape ``<...>`` outside `code` spans."""
    parts = text.split("`")
    return "`".join(PLACEHOLDER.sub(lambda m: html.escape(m.group(0)), p) if i % 2 == 0 else p
                    for i, p in enumerate(parts))


def _cell(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return "`" + text.replace("|", "\\|") + "`"


def recipe_table() -> str:
    from headsurgeon.recipe import key_docs

    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for d in key_docs():
        rows.append(f"| `{d['key']}` | {_cell(d['default'])} | {d['allowed'].replace('|', chr(92) + '|')} | "
                    f"{_escape_placeholders(d['help']).replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def cli_placeholders() -> set[str]:
    """Every ``<...>`` placeholder in the help of the click commands and their options."""
    from headsurgeon.cli import main

    texts = [main.help or ""]
    for cmd in main.commands.values():
        texts += [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
    return {m for t in texts for m in PLACEHOLDER.findall(t)}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, recipe_table())
    return markdown


def on_page_content(content: str, page, config, files) -> str:
    if page.file.src_uri == CLI_PAGE:
        for placeholder in cli_placeholders():
            content = content.replace(placeholder, html.escape(placeholder))
    return content
