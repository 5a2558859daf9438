"""Name fidelity: how often Strobe names an address as `addr2line -f -i -C` does.

    .venv/bin/python benchmarks/fidelity.py [--samples N]

For each binary, N random code addresses (uniform inside function symbols) are
symbolized by Strobe and by binutils' addr2line (elfutils' eu-addr2line referees
file/line and inline-chain differences), exactly as the test
tests/symbolize/test_addr2line_agreement.py does; this prints the shares as the
markdown table of BENCHMARKS.md §10. Binaries: pyenv's libpython 3.8/3.11/3.12/3.13,
Debian's libc with libc6-dbg, and C (-O2 -g), C++ (templates, lambdas; -O2 -g) and
Rust (rustc -O -g) programs compiled here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.symbolize import test_addr2line_agreement as agreement_test  # noqa: E402


def binaries(directory: Path) -> list[tuple[str, Path, Path]]:
    """(label, mapped binary, file with the DWARF) for every row of the table."""
    rows = []
    for version in agreement_test.PYENV_VERSIONS:
        library = agreement_test.pyenv_libpython(version)
        rows.append((f"pyenv libpython{version}", library, library))
    libc = agreement_test.libc_path()
    identifier = agreement_test.build_id(libc)
    debug = Path("/usr/lib/debug/.build-id") / identifier[:2] / f"{identifier[2:]}.debug"
    rows.append(("Debian libc + libc6-dbg", libc, debug))
    generated = agreement_test.generated_program(directory)
    rows.append(("C -O2 -g (300 functions, inlining)", generated, generated))
    data = Path(agreement_test.__file__).parent / "data"
    cpp = directory / "templates"
    subprocess.run(["g++", "-O2", "-g", "-o", str(cpp), str(data / "templates.cpp")], check=True)
    rows.append(("C++ -O2 -g (templates, lambdas, std)", cpp, cpp))
    rust = directory / "work"
    subprocess.run(["rustc", "-O", "-g", "-o", str(rust), str(data / "work.rs")], check=True)
    rows.append(("Rust release -g (lld)", rust, rust))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=agreement_test.SAMPLES)
    args = parser.parse_args()
    keys = list(agreement_test.REQUIRED)
    print("| binary | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    with tempfile.TemporaryDirectory() as directory:
        for label, binary, dwarf in binaries(Path(directory)):
            result = agreement_test.agreement(binary, dwarf, seed=1, samples=args.samples)
            shares = " | ".join(f"{100 * result.shares[key]:.1f}%" for key in keys)
            print(f"| {label} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
