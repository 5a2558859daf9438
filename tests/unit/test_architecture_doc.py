"""docs/architecture.md stays true where it can drift: every thread the agent names is
listed there, and every module, package and path in the tree it lists exists."""

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
        found = [
            path
            for path in (REPO / "agent").rglob(module.split("/")[-1])
            if f"/{path.relative_to(REPO).as_posix()}".endswith(f"/{module}")
        ]
        assert found, f"docs/architecture.md names {module}, which does not exist"


def test_every_package_the_doc_names_exists() -> None:
    for package in set(re.findall(r"`(\w+)/`", DOC)) - {"agent", "remote"}:
        assert (REPO / "agent" / package).is_dir(), f"docs/architecture.md names {package}/"
    tree = DOC[DOC.index("```\nagent/\n") + len("```\nagent/\n") :]
    tree = tree[: tree.index("```", 4)]
    for name in re.findall(r"(?<![\w./])((?:\w+/)*\w+(?:\.py|/))", tree):
        assert (REPO / "agent" / name).exists(), f"the tree in docs/architecture.md names {name}"
