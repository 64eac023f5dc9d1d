"""The `nemoh` entry point: --version, `python -m nemoh`, --help, vLLM's underscore spelling of flags."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nemoh
from nemoh import cli

REPO = Path(__file__).resolve().parents[2]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nemoh {nemoh.__version__}"


def test_python_dash_m_nemoh_is_the_nemoh_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "nemoh", "--version"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"nemoh {nemoh.__version__}"
    out = subprocess.run([sys.executable, "-m", "nemoh", "serve", "--help"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and "--trust-remote-code" in out.stdout and "--enforce-eager" in out.stdout


def test_help_of_every_command(capsys):
    for command in ("serve", "generate", "chat", "quantize"):
        assert cli.main([command, "--help"]) == 0
        assert f"usage: nemoh {command}" in capsys.readouterr().out


def test_vllm_underscore_flag_names():
    assert cli.dashed(["serve", "m", "--max_model_len", "8", "--speculative_config={\"a_b\": 1}", "x_y", "-q"]) == [
        "serve", "m", "--max-model-len", "8", "--speculative-config={\"a_b\": 1}", "x_y", "-q"]
    args = cli.build_parser().parse_args(cli.dashed(["serve", "--max_num_seqs", "3", "--trust_remote_code"]))
    assert args.max_num_seqs == 3 and args.trust_remote_code


def test_a_venv_without_numpy_generates_quietly(tiny_checkpoint):
    """numpy is no dependency: the CLI loads and generates without it, and torch's import-time warning about it
    does not greet a new user."""
    script = ("import sys; sys.modules['numpy'] = None\n"      # as in a fresh venv: torch finds no numpy
              "from nemoh.cli import main\n"
              f"sys.exit(main(['generate', {str(tiny_checkpoint)!r}, '--prompt', 'Hi', '--max-tokens', '3', "
              "'--cache-memory-gb', '0.05', '--device', 'cpu']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NumPy" not in out.stderr and "Traceback" not in out.stderr, out.stderr
