"""Notebook hygiene: committed without outputs, valid nbformat, a Colab badge for their own path."""
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BADGE = "https://colab.research.google.com/github/mixq/mixq/blob/main/notebooks/{name}"


def test_course_notebooks_exist():
    assert (ROOT / "notebooks" / "01_mnist_w4a4.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, c in enumerate(code):
        assert c.outputs == [], f"{path.name}: code cell {i} has outputs; clear them before committing"
        assert c.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    first_md = next(c.source for c in nb.cells if c.cell_type == "markdown")
    assert BADGE.format(name=path.name) in first_md, f"{path.name}: Colab badge missing or wrong"


def test_mnist_notebook_setup_cell():
    nb = nbformat.read(ROOT / "notebooks" / "01_mnist_w4a4.ipynb", as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    assert "'google.colab' in sys.modules" in first.replace('"', "'")
    assert "subprocess" in first and "git+https://github.com/mixq/mixq" in first
    assert "!pip" not in first                      # plain python / nbmake must parse it
    assert 'os.environ.get("MIXQ_SMOKE") == "1"' in first
    assert "torch.cuda.is_available()" in first
