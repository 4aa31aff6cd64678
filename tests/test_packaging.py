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


def _pins(path: Path) -> dict[str, str]:
    """name -> exact version of a constraints-style file (``name==version`` lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().removeprefix("- ")     # also a YAML list item
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==")
            pins[_canonical(name)] = version.strip()
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """name -> the pyproject requirement of every direct dependency (core + hf/notebooks/dev)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("hf", "notebooks", "dev"):
        reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith("mixq")]
    return {_canonical(next(iter(_requirement_names([r])))): r for r in reqs}


def test_constraints_pin_every_dependency_inside_the_declared_ranges():
    from packaging.requirements import Requirement

    pins = _pins(ROOT / "constraints.txt")
    for name, req in _declared().items():
        if name == "triton":           # pinned by the CUDA torch build itself (constraints.txt)
            assert name not in pins
            continue
        spec = Requirement(req).specifier
        assert name in pins, f"constraints.txt does not pin {name}"
        assert spec and pins[name] in spec, f"{name}=={pins[name]} is outside {req!r}"
        assert "<" in str(spec), f"{req!r} needs a tested upper bound"


def test_environment_yml_matches_constraints():
    env = ROOT / "environment.yml"
    text = env.read_text()
    pins = _pins(ROOT / "constraints.txt")
    env_pins = _pins(env)
    assert "python=3.11" in text and "- -c constraints.txt" in text and "- -e ." in text
    assert set(env_pins) | {"triton"} == set(_declared()), "environment.yml lists other packages"
    assert all(pins[n] == v for n, v in env_pins.items()), "environment.yml differs from constraints.txt"


def test_readme_has_two_quick_start_commands():
    main_cmd = _readme_block("main-command")
    test_cmd = _readme_block("test-command")
    assert len(main_cmd.splitlines()) == 1 and len(test_cmd.splitlines()) == 1
    assert "python -m mixq mnist" in main_cmd
    for cmd in (main_cmd, test_cmd):                   # both install the tested set
        assert cmd.startswith("pip install -c constraints.txt -e ")
    assert "pytest tests" in test_cmd.replace("python -m pytest", "pytest") and "MIXQ_SMOKE=1" in test_cmd and re.search(r"--nbmake .*notebooks$", test_cmd)


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts the command between the README markers; check the extraction it uses."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"test_cmd=\$\((.*)\)\n", script).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _readme_block("test-command")
    assert "-c constraints.txt" in script


@pytest.mark.parametrize("folder", ["data", "figures", "results", "notebooks", "mixq/kernels",
                                    "mixq/reference", "mixq/nn", "mixq/hf", "mixq/experiments"])
def test_layout(folder):
    assert (ROOT / folder).is_dir()
