"""notebooks/sharding.ipynb executes top to bottom (nbclient) on 8 simulated CPU devices."""
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_sharding_notebook(monkeypatch):
    # The kernel inherits this environment: the checkout on its path, 8 simulated devices (the
    # notebook's own cell would add the flag; setting it here also makes XLA compile faster).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sharding.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    out = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                    for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "8 devices" in out and "{'data': 1, 'fsdp': 4, 'tensor': 2}" in out
    assert "layers/mlp/wi/kernel" in out and "(2, 16, 128)" in out  # [2, 64, 256] split 4 x 2
    assert "Adam mu of the embedding: (512, 64) -> per device (256, 16)" in out  # split like the param
    assert "per device (2, 32)" in out  # 8 x 32 tokens, rows over data x fsdp = 4
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("SFT step")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert out.count("RM step") == 4 and "fits in 80 GiB" in out
