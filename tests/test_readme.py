"""The README's Python examples (Quick start, Using it) run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    body = text[text.index(f"\n## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.mark.parametrize("section", ["Quick start", "Using it"])
def test_readme_example_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the examples write model.safetensors)
    exec(compile(_python_block(section), f"README.md ({section})", "exec"), {"__name__": "readme"})
    assert (tmp_path / "model.safetensors").exists()
