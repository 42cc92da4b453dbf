"""The docs agree with the code they describe: docs/compatibility.md is what scripts/compatibility.py renders
from the sweep's data, and every relative link between README.md and docs/ reaches a file and a heading."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Markdown files, not the transfer device: one pass decides it.
pytestmark = pytest.mark.sync_pass_only


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compatibility_page_is_generated_from_the_sweep():
    compatibility = _script("compatibility")
    with open(compatibility.OUTPUT) as f:
        committed = f.read()
    rendered = compatibility.render()
    if committed != rendered:
        diff = difflib.unified_diff(committed.splitlines(), rendered.splitlines(), "committed", "rendered", lineterm="")
        pytest.fail("docs/compatibility.md differs from the sweep's data: run `.venv/bin/python "
                    "scripts/compatibility.py` and commit docs/compatibility.md\n" + "\n".join(list(diff)[:20]),
                    pytrace=False)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_between_readme_and_docs_resolve():
    broken = []
    for page in _pages():
        with open(page) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an outside address: not checked here (no network)
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, ROOT)} -> {target}"
            if not os.path.exists(resolved):
                broken.append(f"{where}: no such file")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                broken.append(f"{where}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_stat_is_defined_once_in_the_reference():
    """The stats table of docs/reference.md names exactly the keys `handle.stats()` returns."""
    import fastvideo_offload as fo
    from support.models import TinyDiT

    with open(os.path.join(ROOT, "docs", "reference.md")) as f:
        text = f.read()
    table = text.split("### stats", 1)[1].split("\n\n**", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    handle = fo.enable(TinyDiT(), device="cpu")
    try:
        keys = handle.stats()
    finally:
        handle.disable()
    assert len(documented) == len(set(documented)), "a stat is defined twice"
    assert sorted(documented) == sorted(keys)
