"""Load a ``tools/*.py`` script as a module (the tools are scripts, not part of the installed package)."""
import importlib.util
from pathlib import Path
from typing import Callable

REPO = str(Path(__file__).resolve().parents[1])  # the repository root
TOOLS = Path(REPO) / "tools"


def load_tool(name: str) -> Callable[..., int]:
    """``main`` of ``tools/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
