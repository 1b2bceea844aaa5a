"""The README opens with the two commands, and CI runs exactly the second one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_install_and_test_commands():
    first, second = readme_commands()[:2]
    text = (ROOT / "README.md").read_text()
    assert text.index(first) < text.index("## "), "the two commands come before any section"
    for cmd in (first, second):
        assert "\n" not in cmd and "pip install -q torch==2.13.0" in cmd and "DVC_NO_ANALYTICS=1" in cmd
    assert first.endswith("dvc repro")
    assert second.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    second = readme_commands()[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [second]
