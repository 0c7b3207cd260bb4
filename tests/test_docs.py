"""The Python blocks of docs/usage.md run, in order, as a reader would paste them."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def test_usage_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert namespace["greedy"].shape == (2, 17) and namespace["beams"].shape == (4, 17)
