"""The README's usage example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    """The README's python blocks from the Usage section on, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.find("## Usage\n")
    assert start >= 0, "README has no Usage section"
    blocks = re.findall(r"```python\n(.*?)```", text[start:], re.S)
    assert blocks, "README has no Usage python block"
    return blocks


def test_readme_usage_examples_run():
    blocks = _python_blocks()
    env: dict = {}
    for code in blocks:  # later blocks continue the earlier ones, as a reader would
        assert len(code.strip().splitlines()) <= 12
        exec(compile(code, "README.md", "exec"), env)
