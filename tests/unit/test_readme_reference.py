import subprocess
import sys

from tests.conftest import REPO


def test_readme_reference_tables_match_the_code() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_reference.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
