"""The README's quick-start blocks run as printed and print what the README says they print."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# A python block directly followed by "prints" and a text block holding its expected output.
_EXAMPLE = re.compile(r"```python\n(.*?)```\s*\n\s*prints\s*\n\s*```text\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    return _EXAMPLE.findall(README.read_text(encoding="utf-8"))


def test_readme_has_examples() -> None:
    assert len(_examples()) >= 2


@pytest.mark.parametrize("index", range(len(_examples())))
def test_readme_example_prints_what_readme_says(index: int) -> None:
    code, expected = _examples()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip() == expected.strip()
