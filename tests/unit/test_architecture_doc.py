"""docs/architecture.md stays true where it can drift: every thread the agent names is
listed there, and every module it lists exists."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOC = (REPO / "docs" / "architecture.md").read_text()


def thread_names_in_code() -> set[str]:
    names = set()
    for path in (REPO / "agent").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'\bname=f?"([a-z][\w-]*?)(?:-\{n\})?"', text))
        names |= set(re.findall(r'thread_name_prefix="([\w-]+)"', text))
    return names


def test_every_thread_of_the_agent_is_in_the_doc() -> None:
    names = thread_names_in_code()
    assert {"unwind-tables", "strobe-indexer", "admin-http", "kallsyms"} <= names
    missing = {name for name in names if f"`{name}" not in DOC}
    assert not missing, f"threads missing from docs/architecture.md: {sorted(missing)}"


def test_every_module_the_doc_names_exists() -> None:
    for module in re.findall(r"`([\w/]+\.py)`", DOC):
        found = list((REPO / "agent").rglob(module.split("/")[-1]))
        assert found, f"docs/architecture.md names {module}, which does not exist"
