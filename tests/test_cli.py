"""The console scripts: help, listings, and one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from multimodal_general.cli_support import run_app
from multimodal_general.errors import ConfigurationError


def run(*args):
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("module", ["multimodal_general.cli", "brats_cggm.cli"])
def test_help_lists_commands(module):
    result = run(f"import sys; sys.argv=['x', '--help']; from {module} import main; main()")
    assert result.returncode == 0, result.stderr
    assert "Commands" in result.stdout


def test_balancers_lists_presets_and_metrics():
    result = run("import sys; sys.argv=['x', 'balancers']; from multimodal_general.cli import main; main()")
    assert result.returncode == 0, result.stderr
    for word in ("cggm", "none", "paper", "official", "stable", "neg_mae", "soft_dice"):
        assert word in result.stdout


def test_info_reports_the_stack():
    result = run("import sys; sys.argv=['x', 'info']; from brats_cggm.cli import main; main()")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "CUDA devices" in result.stdout


def test_the_console_script_keeps_monai_from_importing_transformers():
    """MONAI imports TransCheX's BERT at every start when transformers is installed (2-3 s);
    the brats-cggm process blocks it, and MONAI's networks still import and build."""
    result = run("import sys; sys.argv=['x', 'info']; from brats_cggm.cli import main\n"
                 "try:\n    main()\nexcept SystemExit:\n    pass\n"
                 "import monai.networks.nets as nets\n"
                 "print(sys.modules['transformers'], nets.BasicUNet(3, 4, 3, (2, 2, 2, 2, 2, 2)).__class__.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["None", "BasicUNet"], result.stdout[-500:]


def test_unknown_command_exits_2_without_traceback():
    result = run("import sys; sys.argv=['x', 'bogus']; from brats_cggm.cli import main; main()")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "No such command" in result.stderr


def test_user_errors_become_one_line_and_exit_2(capsys):
    import typer

    app = typer.Typer()

    @app.command()
    def fail() -> None:
        raise ConfigurationError("unknown CGGM preset 'fast'")

    with pytest.raises(SystemExit) as exit_info:
        import sys as _sys

        argv, _sys.argv = _sys.argv, ["x"]
        try:
            run_app(app)
        finally:
            _sys.argv = argv
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown CGGM preset 'fast'"
