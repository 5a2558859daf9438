"""Regenerate the README's configuration and metrics reference from the code.

    .venv/bin/python scripts/gen_reference.py          # rewrite README.md
    .venv/bin/python scripts/gen_reference.py --check  # exit 1 if README.md is stale

The tables live between <!-- options:begin/end --> and <!-- metrics:begin/end --> markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from agent import metrics
from agent.config import OPTIONS, _show_default

README = Path(__file__).resolve().parent.parent / "README.md"


def options_table() -> str:
    rows = ["| flag | environment / config key | default | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        flag = "`--" + option.name.replace("_", "-") + "`" if option.flag else "(file only)"
        env = f"`STROBE_{option.name.upper()}` / " if option.flag else ""
        commands = ", ".join(option.commands)
        rows.append(
            f"| {flag} | {env}`{option.name}` | {_show_default(option)} | "
            f"{option.help} ({commands}) |"
        )
    return "\n".join(rows)


def metrics_table() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, Counter | Gauge | Histogram) or value._name in seen:
            continue
        seen.add(value._name)
        suffix = "_total" if value._type == "counter" else ""
        labels = ", ".join(value._labelnames) or "—"
        rows.append(
            f"| `{value._name}{suffix}` | {value._type} | {labels} | {value._documentation} |"
        )
    return "\n".join(rows)


def render(text: str) -> str:
    for name, table in (("options", options_table()), ("metrics", metrics_table())):
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the {name} markers")
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    return text


def main() -> int:
    current = README.read_text()
    wanted = render(current)
    if "--check" in sys.argv:
        if wanted != current:
            print("README.md reference tables are stale: run scripts/gen_reference.py")
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
