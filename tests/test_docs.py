"""The README's code and the shipped configs run as written."""

import re
from pathlib import Path

import yaml

from molkern.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs():
    """Every ```python block runs (```py blocks that need minutes of data processing are not run)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_shipped_model_configs_build():
    for path in sorted((ROOT / "configs").glob("model_*.yaml")):
        model = build_model(yaml.safe_load(path.read_text()))
        assert model.group.name in ("o3", "so2") and sum(p.numel() for p in model.parameters()) > 0
