"""The Python blocks of docs/usage.md run, in order, as a reader would paste them; every relative link in the
README and docs/ reaches a file, and every #anchor a heading of it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "usage.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_usage_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert namespace["greedy"].shape == (2, 17) and namespace["beams"].shape == (4, 17)


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats -1, -2."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of a markdown page whose file is missing or whose #anchor names no heading there."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = page.parent / path if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text())):
            broken.append(f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}: {target}")
    return broken


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Setup (`--flag`)\n\n## Setup (`--flag`)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#setup---flag) [twice](other.md#setup---flag-1) [self](#top) [web](https://x.org)\n"
                    "# Top\n[gone](missing.md) [stale](other.md#results)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.md", "page.md: other.md#results"]


def test_doc_links_resolve():
    broken = [link for page in PAGES for link in broken_links(page)]
    assert not broken, f"links to a missing file or heading (fix the link or the heading): {broken}"
