"""Every user mistake is one line, `nemoh: error: ...`, naming the flag or file and what to do; exit status 2; no
traceback. Checks that need no model run before it loads (a busy port costs a second, not a model load)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nemoh import cli

REPO = Path(__file__).resolve().parents[2]


def error_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("nemoh: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model would be loaded: these errors must come first."""
    from nemoh.engine.async_engine import AsyncLLMEngine
    from nemoh.engine.llm_engine import LLMEngine

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(AsyncLLMEngine, "from_pretrained", refuse)
    monkeypatch.setattr(LLMEngine, "from_pretrained", refuse)


def test_device_cuda_on_a_cpu_only_torch(monkeypatch, capsys, tiny_checkpoint, no_loading):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error_line(capsys, cli.main(["serve", str(tiny_checkpoint), "--device", "cuda"]),
               "--device cuda", "built without CUDA", "--device cpu")
    monkeypatch.setattr(torch.version, "cuda", "12.8")      # a CUDA build on a machine without a GPU
    error_line(capsys, cli.main(["chat", str(tiny_checkpoint), "--device", "cuda:0"]),
               "--device cuda:0", "no CUDA GPU is visible", "--device cpu")
    error_line(capsys, cli.main(["serve", str(tiny_checkpoint), "--device", "tpu"]), "--device tpu")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_port_out_of_range(capsys, port):
    error_line(capsys, cli.main(["serve", "--port", port]), "--port", f"{port} is not a TCP port", "1-65535")


def test_busy_port_is_reported_before_the_model_loads(capsys, tiny_checkpoint, no_loading):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli.main(["serve", str(tiny_checkpoint), "--port", str(port)])
    error_line(capsys, rc, f"--port {port}", "already in use", "another --port")


def test_model_that_is_a_file(capsys, tiny_checkpoint):
    line = error_line(capsys, cli.main(["serve", str(tiny_checkpoint / "config.json")]),
                      "config.json is a file", "checkpoint directory", str(tiny_checkpoint))
    assert "does not exist" not in line
    error_line(capsys, cli.main(["serve", str(tiny_checkpoint / "nowhere")]), "nowhere does not exist",
               "local checkpoints only")


def test_another_models_checkpoint(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    line = error_line(capsys, cli.main(["serve", str(tmp_path)]), "config.json",
                      "not a NemotronH checkpoint (model_type 'llama'")
    assert "hybrid_override_pattern" not in line


def test_quantize_errors(capsys, tiny_checkpoint, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("")
    error_line(capsys, cli.main(["quantize", str(tiny_checkpoint), str(full)]),
               f"destination {full} exists and is not empty", "new or empty directory")
    error_line(capsys, cli.main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out")]),
               f"source {tmp_path / 'missing'} does not exist", "checkpoint directory")
    error_line(capsys, cli.main(["quantize", str(tiny_checkpoint), str(tmp_path / "out"), "--format", "fp8"]),
               "'fp8' needs calib_file (--calib)")
    error_line(capsys, cli.main(["quantize", str(tiny_checkpoint), str(tmp_path / "out"), "--calib", "nope.txt"]),
               "--calib", "nope.txt: no such file")
    error_line(capsys, cli.main(["quantize", str(tiny_checkpoint)]), "required: dst", "nemoh quantize --help")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--tokenizer", "/nonexistent"], ["--tokenizer /nonexistent", "no tokenizer.json"]),
    (["--quantization", "fp8"], ["--quantization fp8", "is not quantized", "nemoh quantize"]),
    (["--pipeline-parallel-size", "2"], ["--pipeline-parallel-size 2", "only 1"]),
    (["--load-format", "pt"], ["--load-format pt", "auto or safetensors"]),
    (["--response-role", "bot"], ["--response-role bot", "assistant"]),
    (["--middleware", "my.module.Middleware"], ["--middleware", "not supported"]),
    (["--tensor-parallel-size", "3"], ["--tensor-parallel-size 3", "num_attention_heads 4 is not divisible"]),
    (["--tensor-parallel-size", "4"], ["--tensor-parallel-size 4", "n_groups 2 is not divisible"]),
    (["--ssl-keyfile", "key.pem"], ["--ssl-keyfile needs --ssl-certfile"]),
    (["--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem"], ["--ssl-certfile/--ssl-keyfile", "cert.pem"]),
    (["--speculative-config", "{not json"], ["--speculative-config is not valid JSON"]),
    (["--max-num-seqs", "0"], ["--max-num-seqs", "positive integer"]),
    (["--max-waiting-requests", "0"], ["--max-waiting-requests", "positive integer"]),
    (["--dtype", "int8"], ["--dtype int8"]),
    (["--tool-call-parser", "none", "--enable-auto-tool-choice"], ["--enable-auto-tool-choice needs"]),
    (["--reasoning-parser", "deepseek_r1"], ["--reasoning-parser deepseek_r1", "unknown parser"]),
    (["--model", "/elsewhere"], ["two models given"]),
    (["--chat-template", "/nonexistent.jinja"], ["--chat-template", "/nonexistent.jinja"]),
])
def test_flag_errors_name_the_flag(capsys, tiny_checkpoint, no_loading, argv, needles):
    error_line(capsys, cli.main(["serve", str(tiny_checkpoint), "--port", "0", *argv]), *needles)


def test_speculative_config_on_a_checkpoint_without_mtp(capsys, tmp_path, no_loading):
    from checkpoints import make_checkpoint

    path, _ = make_checkpoint(tmp_path / "nomtp", with_mtp=False)
    capsys.readouterr()
    error_line(capsys, cli.main(["serve", str(path), "--speculative-config", '{"method":"mtp"}']),
               "--speculative-config", "no", "MTP block")


@pytest.mark.parametrize("argv, needle", [
    (["serve", "{ckpt}/config.json"], "config.json is a file"),
    (["quantize", "{ckpt}", "{ckpt}"], "is not empty"),
])
def test_the_installed_command_prints_no_traceback(tiny_checkpoint, argv, needle):
    """Through `python -m nemoh`, as the console script runs it."""
    argv = [a.format(ckpt=tiny_checkpoint) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "nemoh", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nemoh: error: ") and needle in lines[0], out.stderr
