"""mkdocs hook: pages generated from the code, so they cannot drift from it.

``<!-- recipe-keys -->`` in a page becomes the table of every recipe key in
``headsurgeon.recipe.key_docs()`` with its default, allowed values and meaning.
"""
from __future__ import annotations

import json

MARKER = "<!-- recipe-keys -->"


def _cell(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return "`" + text.replace("|", "\\|") + "`"


def recipe_table() -> str:
    from headsurgeon.recipe import key_docs

    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for d in key_docs():
        rows.append(f"| `{d['key']}` | {_cell(d['default'])} | {d['allowed'].replace('|', chr(92) + '|')} | "
                    f"{d['help'].replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, recipe_table())
    return markdown
