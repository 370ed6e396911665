"""The notebooks run top to bottom on a real kernel (this venv's Python), and are stored stripped."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist_and_are_stored_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "analysis.ipynb"}
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # A kernelspec of our own, pointing at this interpreter: a fresh machine needs no
    # `ipykernel install`, and the notebook sees the same packages as the tests.
    spec = tmp_path / "jupyter" / "kernels" / "oneshot-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "oneshot", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("ONESHOT_RUN_DIRS", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="oneshot-test", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 3  # the cell, the alphas, the curves are shown inline
