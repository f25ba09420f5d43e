"""The command line's entry points: `lenslab` and `python -m lenslab`."""

import subprocess
import sys

import pytest

from lenslab import __version__
from lenslab.cli import SUBCOMMANDS, main


def test_version_via_python_m():
    result = subprocess.run([sys.executable, "-m", "lenslab", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"lenslab {__version__}"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lenslab" in capsys.readouterr().out


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


def test_public_api_names_resolve():
    import lenslab

    for name in lenslab.__all__:
        assert getattr(lenslab, name) is not None


@pytest.mark.parametrize("name", ["train", "eval", "cbe", "depth", "transfer"])
def test_a_missing_data_file_is_refused_before_any_model_loads(name, capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    # The model directory does not exist either: reaching the model would fail with another message.
    argv = [name, "--model", str(tmp_path / "no-model"), "--data", str(missing), "--output", str(tmp_path / "out")]
    argv += {"transfer": ["--lens", str(tmp_path)], "cbe": ["--layers", "0"]}.get(name, [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument --data: {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_flag_accepts_hub_names_self_and_existing_files(tmp_path):
    from lenslab.specs import data_source

    existing = tmp_path / "text.txt"
    existing.write_text("a document\n")
    for value in ("self", "allenai/c4", str(existing), str(tmp_path)):
        assert data_source(value) == value
