"""Both notebooks execute top to bottom (nbclient), so they cannot rot. The quickstart reuses the test
session's smoke pipeline run when test_pipeline made one (a rerun skips every finished step)."""
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    return nb


def outputs(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) + str(
        o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(autouse=True)
def importable_package(monkeypatch):
    # The kernel imports this checkout (the notebooks' install cell is for Colab).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def test_losses_notebook():
    out = outputs(run_notebook("losses.ipynb"))
    assert "rm_loss:" in out and "the tie (1, 2) is dropped" in out and "gamma =  27.8" in out


@pytest.mark.slow  # the miniature's smoke pipeline (shared with test_pipeline, also slow)
def test_quickstart_notebook(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INSTRUCTGPT_QUICKSTART_WORKDIR", str(tmp_path_factory.getbasetemp() / "pipeline_smoke"))
    nb = run_notebook("quickstart.ipynb")
    out = outputs(nb)
    assert "| PPO-ptx |" in out and "win rate vs SFT" in out
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
