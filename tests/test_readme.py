"""The README's usage example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _usage_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S)
    assert m, "README has no Usage python block"
    return m.group(1)


def test_readme_usage_example_runs():
    code = _usage_block()
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
