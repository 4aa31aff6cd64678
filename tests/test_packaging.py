"""The install and test path: pyproject, environment.yml, README quick start and .ci/run agree."""
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _requirement_names(reqs):
    return {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```\s*(.*?)\s*```\s*<!-- /{marker} -->", text, re.S)
    assert m, f"README.md has no {marker} block"
    return m.group(1).strip()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for name, reqs in project["optional-dependencies"].items():
        declared |= _requirement_names(r for r in reqs if not r.startswith("mixq"))
    env_text = (ROOT / "environment.yml").read_text()
    pip_lines = [ln.strip()[2:].strip() for ln in env_text.splitlines()
                 if ln.strip().startswith("- ") and ln.startswith("      ")]
    mirrored = _requirement_names(p for p in pip_lines if not p.startswith("-e"))
    assert declared == mirrored, f"only in pyproject: {declared - mirrored}; only in environment.yml: {mirrored - declared}"
    assert "python=3.11" in env_text


def test_readme_has_two_quick_start_commands():
    main_cmd = _readme_block("main-command")
    test_cmd = _readme_block("test-command")
    assert len(main_cmd.splitlines()) == 1 and len(test_cmd.splitlines()) == 1
    assert "python -m mixq mnist" in main_cmd
    assert "pytest tests" in test_cmd.replace("python -m pytest", "pytest") and "MIXQ_SMOKE=1" in test_cmd and re.search(r"--nbmake .*notebooks$", test_cmd)


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts the command between the README markers; check the extraction it uses."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"test_cmd=\$\((.*)\)\n", script).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _readme_block("test-command")


@pytest.mark.parametrize("folder", ["data", "figures", "results", "notebooks", "mixq/kernels"])
def test_layout(folder):
    assert (ROOT / folder).is_dir()
