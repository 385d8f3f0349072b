"""The README's commands and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  commands = re.findall(r"```bash\n(.+?)\n```", readme)
  assert len(commands) == 2, "the README gives exactly two commands"
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci == commands[1]
  assert "tmlx.main --config=experiments/tiny.py" in commands[0]
