import subprocess
import sys
from pathlib import Path


def test_cli_demo_writes_the_mixture_figure(tmp_path):
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "ncsn-pipeline"), "toy-mixture", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mixture.png").stat().st_size > 10_000
    assert "annealed Langevin" in out.stdout


def test_cli_without_command_fails_with_usage():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: ncsn-pipeline" in out.stderr


def test_verbose_is_taken_before_or_after_the_subcommand_and_version_is_printed():
    from importlib.metadata import version

    from pipelines.cli import build_parser

    base = ["sample", "--checkpoint", "c.pt", "--num-samples", "4", "--output", "o"]
    assert build_parser().parse_args(base).verbose is False
    assert build_parser().parse_args(["-v", *base]).verbose is True
    assert build_parser().parse_args([*base, "-v"]).verbose is True
    out = subprocess.run([str(Path(sys.executable).parent / "ncsn-pipeline"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"ncsn-pipeline {version('ncsn-pipeline')}"
