"""Every Python snippet in the README runs as written (and the seed README's usage does too)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)


def test_readme_has_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/train.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/test.sh" in ci
