"""Every shipped QM9 config parses (unknown keys would fail) and builds its model; the paper's are ~2M parameters."""

import os
from pathlib import Path

import pytest

from molkern.cli import lightning_main
from molkern.models.baselines import count_parameters

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("qm9_*.yaml"))
SLOW = pytest.mark.skipif(os.environ.get("MOLKERN_SLOW") != "1", reason="builds a 2M-parameter model; MOLKERN_SLOW=1")


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[pytest.mark.slow, SLOW]) if "paper" in p.stem else p for p in CONFIGS],
    ids=[p.stem for p in CONFIGS],
)
def test_qm9_config_builds(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers would create runs/ here
    cli = lightning_main(["--config", str(path)], run=False)
    params = count_parameters(cli.model.model)
    if "paper" in path.stem:
        assert 1.8e6 < params < 2.2e6, params  # Table 2: "approx. 2 * 10^6 parameters"
    assert cli.model.hparams.model["group"] == "o3"


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"qm9_cpu_quick", "qm9_paper_w16_l30", "qm9_paper_w24_l15", "qm9_fig4_standard",
            "qm9_fig4_implicit", "qm9_fig4_bonds", "qm9_fig4_bonds_atoms"} <= names
