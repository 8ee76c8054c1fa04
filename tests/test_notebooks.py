"""The notebooks run end to end at a tiny size (SPACEJAX_NOTEBOOK_SMALL=1) and show their plots;
the committed files carry no outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> the PNG files it writes under SPACEJAX_NOTEBOOK_OUT
EXPECTED = {
    "01_quickstart.ipynb": ["01_quickstart/quickstart.png", "01_quickstart/plots/kl.png",
                            "01_quickstart/plots/steps.png"],
    "02_space_vs_spin.ipynb": ["02_space_vs_spin/tasks.png", "02_space_vs_spin/markov/kl.png",
                               "02_space_vs_spin/teacher/kl.png", "02_space_vs_spin/teacher/steps.png"],
    "03_ablation_mu_beta.ipynb": ["03_ablation_mu_beta/ablation.png", "03_ablation_mu_beta/kl.png"],
}


def test_every_notebook_is_tested_and_stripped():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for name in EXPECTED:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs; strip them"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_plots(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SPACEJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SPACEJAX_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{name} displayed no image"
    for path in EXPECTED[name]:
        assert (tmp_path / path).read_bytes()[:4] == b"\x89PNG", path
