"""The README's usage example runs as written, the docs' examples too, and every
relative link of README.md and docs/*.md leads to a file (and heading) that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _readme_usage_blocks() -> list[str]:
    """The README's python blocks from the Usage section on, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.find("## Usage\n")
    assert start >= 0, "README has no Usage section"
    blocks = _python_blocks(text[start:])
    assert blocks, "README has no Usage python block"
    return blocks


def _run(blocks: list[str], name: str) -> None:
    env: dict = {}
    for code in blocks:  # later blocks continue the earlier ones, as a reader would
        assert len(code.strip().splitlines()) <= 12, f"{name}: a python block over 12 lines"
        exec(compile(code, name, "exec"), env)


def test_readme_usage_examples_run():
    _run(_readme_usage_blocks(), "README.md")


@pytest.mark.parametrize(
    "page", [p for p in PAGES[1:] if _python_blocks(p.read_text())], ids=lambda p: p.name
)
def test_docs_python_examples_run(page: Path):
    _run(_python_blocks(page.read_text()), f"docs/{page.name}")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text without markup, lower case, punctuation
    other than '-' and '_' dropped, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    """The targets of a page's Markdown links and images that are not URLs (code
    blocks left out: their brackets are code, not links)."""
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_slug_follows_github():
    assert slug("Large codebooks: 2^14 to 2^18 codes on bounded memory") == (
        "large-codebooks-214-to-218-codes-on-bounded-memory"
    )
    assert slug("Codebook health: k-means init (EMA, K = 512)") == (
        "codebook-health-k-means-init-ema-k--512"
    )
    assert slug("Set-up (two commands, fresh machine)") == "set-up-two-commands-fresh-machine"


def test_links_find_their_pages():
    assert relative_links(ROOT / "README.md"), "README has no relative links"
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_doc_page():
    """A reader finds every page of docs/ from the front page."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_keeps_the_setup_commands():
    """The newcomer check and CI look for the two commands under this heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Set-up (two commands, fresh machine)\n") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert 'pip install torch==2.13.0 -e ".[train]" && vqkit train --out runs/quickstart' in block
    assert 'pip install -q -e ".[test]" && python -m pytest -q' in block
