"""python -m mixq: every command dispatched the same way (mixq.__main__.COMMANDS), --help of the
package and of each command."""
import subprocess
import sys

import pytest

from mixq.__main__ import COMMANDS, command_module, main, usage

EXPECTED = {"mnist", "bench gemm", "bench e2e", "bench attention", "tune", "report", "quantize", "eval",
            "sweep", "full", "ablation"}


def test_help_lists_every_command_with_one_line(capsys):
    assert set(COMMANDS) == EXPECTED
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == usage()
    for words, (_, text) in COMMANDS.items():
        assert sum(line.split(text)[0].strip() == words for line in out.splitlines()) == 1


@pytest.mark.parametrize("words", sorted(EXPECTED))
def test_each_command_is_a_module_with_parser_and_main(words, capsys):
    module = command_module(words)
    assert module.build_parser().prog == f"python -m mixq {words}"
    assert module.__doc__ and f"python -m mixq {words}" in module.__doc__
    with pytest.raises(SystemExit) as e:
        main([*words.split(), "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m mixq {words}")


def test_unknown_command_and_no_command(capsys):
    assert main(["bench"]) == 2
    assert main(["bench", "gpu"]) == 2
    assert "unknown command 'bench gpu'" in capsys.readouterr().err
    assert main([]) == 2


def test_python_dash_m_mixq_runs_a_command():
    out = subprocess.run([sys.executable, "-m", "mixq", "sweep", "--list"], check=True,
                         capture_output=True, text=True).stdout
    assert out.split()[0] == "w8a8"
