"""notebooks/quickstart.ipynb: committed without outputs, in sync with its generator, and it runs.

The full execution (the default model loaded twice, a sharded placement on 8 CPU devices, a
tiny training run and an artifact export) takes several minutes on 2 cores, so it is marked slow;
the default run checks the notebook's form and that every code cell compiles.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
GENERATOR = os.path.join(REPO, "notebooks", "build_quickstart.py")


def _generator():
    spec = importlib.util.spec_from_file_location("build_quickstart", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_has_no_outputs():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} carry outputs or execution counts: commit it clean " \
                      f"(python notebooks/build_quickstart.py)"


def test_notebook_matches_its_generator():
    with open(NOTEBOOK) as f:
        on_disk = f.read()
    assert on_disk == _generator().render(), (
        "notebooks/quickstart.ipynb differs from notebooks/build_quickstart.py: edit the cells "
        "there and run `python notebooks/build_quickstart.py`")


def test_notebook_code_cells_compile_and_cover_the_tour():
    nb = _read()
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            compile(cell.source, f"quickstart.ipynb cell {i}", "exec")
    # The first code cell sets up the 8 CPU devices before anything imports jax.
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    assert "--xla_force_host_platform_device_count=8" in first
    assert first.index("XLA_FLAGS") < first.index("import jax")
    for needle in ('Engine.from_pretrained("smollm2-135m-instruct"', ".generate(", ".stream(",
                   "make_mesh(", "print_layout(", "Trainer(", "plt.", "artifact.export(",
                   "artifact.load(", "roofline.report("):
        assert needle in source, f"the quickstart no longer shows {needle}"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from nbclient import NotebookClient

    nb = _read()
    # The kernel inherits this environment: the checkout on its path (the notebook also finds
    # it from notebooks/, but here it runs in a scratch directory), no inherited XLA flags.
    monkeypatch.setenv("PYTHONPATH", REPO)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, kernel_name="python3", timeout=900, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "same tokens as the engine: True" in outputs
    assert "fsdp" in outputs and "per device" in outputs, "no layout table in the outputs"
    first, last = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", outputs).groups()
    assert float(last) < float(first), f"the tiny model's loss did not fall: {first} -> {last}"
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs), "the loss plot produced no image"
