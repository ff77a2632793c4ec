import subprocess
import sys
from pathlib import Path


def test_cli_demo_writes_the_mixture_figure(tmp_path):
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "ncsn-pipeline"), "demo", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mixture.png").stat().st_size > 10_000
    assert "annealed Langevin" in out.stdout


def test_cli_without_command_fails_with_usage():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: ncsn-pipeline" in out.stderr
