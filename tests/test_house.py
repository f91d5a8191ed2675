"""House rules that keep the layout honest (docs/architecture.md): no private name crosses a file boundary, no file
in xmx/ grows past 500 lines without saying why at its top."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "xmx"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(root: Path = PKG) -> list[str]:
    """Every ``from xmx.x import _name`` and every ``module._name`` on an imported xmx module, file by file: what one
    file takes from another must be public (a private module such as ``methods/_training.py`` is fine: its names
    are public)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules: set[str] = set()  # local names bound to xmx modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "xmx"):
                for a in node.names:
                    if _private(a.name):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno}: from {node.module} import {a.name}")
                    else:
                        modules.add(a.asname or a.name)  # may be a module (from xmx import jobs)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "xmx":
                        modules.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in modules and _is_module_chain(node.value, modules):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def _is_module_chain(node: ast.AST, modules: set[str]) -> bool:
    """``xmx.run`` / ``jobs`` / ``xmx.methods.base``: a name bound to a module, or attributes of one (a lowercase
    chain: ``jobs.JobIndex._x`` is a class attribute, which is the class's own business)."""
    if isinstance(node, ast.Name):
        return node.id in modules and node.id[:1].islower()
    return isinstance(node, ast.Attribute) and node.attr[:1].islower() and _is_module_chain(node.value, modules)


def test_no_private_name_is_imported_across_files():
    found = private_crossings()
    assert not found, "private names used across files (make them public, or move them to a shared module):\n" + \
        "\n".join(found)


def test_the_check_finds_a_private_import(tmp_path):
    pkg = tmp_path / "xmx"
    pkg.mkdir()
    (pkg / "a.py").write_text("def _helper():\n    return 1\n")
    (pkg / "b.py").write_text("from xmx.a import _helper\n")
    (pkg / "c.py").write_text("import xmx.a\n\n\ndef f():\n    return xmx.a._helper()\n")
    (pkg / "d.py").write_text("from xmx import a\n\n\ndef f():\n    return a._helper()\n")
    found = private_crossings(pkg)
    assert len(found) == 3, found


def test_no_file_in_xmx_over_500_lines_without_a_reason_at_its_top():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > 500 and "long file:" not in "\n".join(lines[:40]).lower():
            long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    assert not long, "split these files, or write at their top why they are one file ('Long file: <reason>'):\n" + \
        "\n".join(long)


def test_one_definition_of_the_results_schema_and_the_selection_modes():
    """``SCHEMA`` and ``SELECTION_MODES`` are written once, in xmx/results.py; every other file imports them."""
    again = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "results.py" and path.parent == PKG:
            continue
        text = path.read_text(encoding="utf-8")
        for literal in ('"xmx.results/1"', '("val", "paper")', "('val', 'paper')"):
            if literal in text:
                again.append(f"{path.relative_to(REPO)}: {literal}")
    assert not again, "import these from xmx.results instead:\n" + "\n".join(again)


SPEC = "spec " + "§"  # the old external spec's citations (written split so that this file does not match)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".json", ".sh", ""}


def _repo_text_files():
    import subprocess
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in names:
        path = REPO / name
        if name and path.suffix in TEXT_SUFFIXES and path.is_file():
            yield path


def test_no_citation_of_a_document_outside_the_repository():
    """The method docs and docs/ are the specification: code cites ``docs/methods/<file>.md#section``."""
    found = [f"{p.relative_to(REPO)}:{i}" for p in _repo_text_files()
             for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if SPEC in line or "shared/" + "spec/" in line]
    assert not found, f"cite docs/methods/<file>.md#<section> instead of the old spec: {found}"


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower-case, punctuation dropped, spaces to dashes."""
    import re
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_cited_doc_section_exists():
    """``docs/<...>.md#<anchor>`` cited anywhere names a file and a heading that exist."""
    import re
    missing = []
    for p in _repo_text_files():
        for doc, anchor in re.findall(r"(docs/[\w/.-]+\.md)(?:#([\w-]+))?", p.read_text(encoding="utf-8",
                                                                                       errors="replace")):
            target = REPO / doc
            if not target.is_file():
                missing.append(f"{p.relative_to(REPO)}: {doc}")
            elif anchor and anchor not in _anchors(target):
                missing.append(f"{p.relative_to(REPO)}: {doc}#{anchor}")
    assert not missing, "citations of missing docs or sections:\n" + "\n".join(sorted(set(missing)))
