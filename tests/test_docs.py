"""The docs hook (docs/hooks.py): generated pages must not hide help-text placeholders as HTML tags."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

HOOKS = Path(__file__).resolve().parents[1] / "docs" / "hooks.py"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_table_escapes_placeholders_outside_code():
    h = _hooks()
    table = h.recipe_table()
    assert "runs/&lt;recipe&gt;-&lt;time&gt;" in table and "<recipe>" not in table
    assert h._escape_placeholders("a <N> and `b <N>`") == "a &lt;N&gt; and `b <N>`"


def test_cli_page_escapes_every_help_placeholder():
    h = _hooks()
    found = h.cli_placeholders()
    assert {"<model>", "<recipe>", "<N>"} <= found
    page = SimpleNamespace(file=SimpleNamespace(src_uri=h.CLI_PAGE))
    html = "<td>" + " ".join(sorted(found)) + "</td>"
    out = h.on_page_content(html, page, None, None)
    assert out.startswith("<td>") and out.endswith("</td>") and not any(p in out for p in found)
    other = SimpleNamespace(file=SimpleNamespace(src_uri="index.md"))
    assert h.on_page_content(html, other, None, None) == html
