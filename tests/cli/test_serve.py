"""`nemoh serve` start-up: the same defaults for every checkpoint, the banner, vLLM's flags, and README's
openai example against a quantized copy of the demo model, served as a user runs it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nemoh import cli
from nemoh.cli import vllm_flags
from nemoh.cli.common import DEMO_DIR, DEMO_MODEL_DIR, has_weights

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--port", "0", "--cache-memory-gb", "0.05", "--max-num-seqs", "4", "--device", "cpu"]
needs_demo = pytest.mark.skipif(not has_weights(DEMO_MODEL_DIR), reason="the demo model's weights are not bundled")


@pytest.fixture
def started(monkeypatch, caplog):
    """Run `nemoh serve` up to the moment uvicorn would take over; returns the server it built."""
    from nemoh.server.runner import NemohServer

    seen = {}

    def run(self, sockets=None):
        (sock,) = sockets   # bound before the model loaded; uvicorn listens on it
        seen["server"], seen["port"] = self, sock.getsockname()[1]

    monkeypatch.setattr(NemohServer, "run", run)
    caplog.set_level("INFO")

    def start(*argv: str):
        assert cli.main(["serve", *argv]) == 0
        server = seen["server"]
        assert server.config.port == seen["port"] != 0
        return server, server.config.app.state.nemoh

    return start


def banner(caplog) -> str:
    (text,) = [r.getMessage() for r in caplog.records if r.name == "nemoh.serve" and "serving" in r.getMessage()]
    return text


@pytest.mark.parametrize("model", [pytest.param(None, marks=needs_demo), "tiny"])
def test_the_same_defaults_for_every_model(started, caplog, tiny_checkpoint, model):
    """Bare `nemoh serve` and `nemoh serve PATH` both turn on auto tool choice and MTP (k=3) and say so."""
    argv = SMALL if model is None else [str(tiny_checkpoint), *SMALL]
    server, state = started(*argv)
    settings, engine = state.settings, state.engine.engine
    assert settings.enable_auto_tool_choice and settings.tool_call_parser == "qwen3_coder"
    assert settings.reasoning_parser == "super_v3"
    assert engine.num_speculative_tokens == 3
    assert settings.served_model_names == ["nemoh-demo" if model is None else str(tiny_checkpoint)]
    text = banner(caplog)
    path = DEMO_MODEL_DIR if model is None else tiny_checkpoint
    port = server.config.port
    for line in (f"serving {path}", f"served model name   {settings.served_model_names[0]}",
                 f"weights             {'bfloat16' if model is None else 'float32'} on cpu, quantization none",
                 "MTP speculative     on, k=3",
                 "prefix caching      on, ",
                 "parsers             reasoning super_v3, tool calls qwen3_coder, auto tool choice on",
                 "context             max_model_len 4096 (checkpoint 4096)",
                 f"URL                 http://127.0.0.1:{port}/v1"):
        assert line in text, text
    runner = engine.runner
    assert re.search(rf"cache +{runner.num_kv_blocks} KV blocks x 16 tokens = \d+ tokens \(\w+, [\d.]+ GiB\) \+ "
                     rf"{runner.num_state_slots} Mamba state slots \([\d.]+ GiB\) = [\d.]+ GiB", text), text
    assert re.search(r"loaded in +\d+\.\d s", text), text


def test_flags_turn_the_defaults_off(started, caplog, tiny_checkpoint):
    for off in ("none", "{}"):
        caplog.clear()
        _, state = started(str(tiny_checkpoint), *SMALL, "--no-enable-auto-tool-choice", "--speculative-config", off,
                           "--no-enable-prefix-caching")
        assert not state.settings.enable_auto_tool_choice and state.engine.engine.num_speculative_tokens == 0
        assert state.engine.engine.prefix_cache is None
        text = banner(caplog)
        assert "MTP speculative     off" in text and "auto tool choice off" in text
        assert "prefix caching      off" in text
    caplog.clear()
    _, state = started(str(tiny_checkpoint), *SMALL, "--tool-call-parser", "none", "--speculative-config",
                       '{"method": "mtp", "num_speculative_tokens": 2}', "--max-model-len", "8192")
    assert not state.settings.enable_auto_tool_choice and state.engine.engine.num_speculative_tokens == 2
    text = banner(caplog)
    assert "tool calls none, auto tool choice off" in text and "MTP speculative     on, k=2" in text
    assert "max_model_len 8192 (checkpoint 4096)" in text
    assert any("max_model_len 8192" in r.getMessage() and "max_position_embeddings 4096" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")


def test_steps_have_a_time_budget_unless_turned_off(started, tiny_checkpoint):
    _, state = started(str(tiny_checkpoint), *SMALL)
    assert state.engine.engine.step_budget.seconds == 0.25
    _, state = started(str(tiny_checkpoint), *SMALL, "--max-step-seconds", "0")
    assert state.engine.engine.step_budget is None


def test_a_vllm_command_line_runs(started, caplog, tiny_checkpoint):
    """vLLM's flags work or are accepted with one line each saying they change nothing here."""
    no_effect = []
    for flag, (kind, _) in vllm_flags.NO_EFFECT.items():
        no_effect += [flag] if kind != vllm_flags.VALUE else [flag, "x"]
    only = [a for flag, (_, values, _) in vllm_flags.ONLY.items() for a in (flag, str(values[-1]))]
    server, state = started(
        str(tiny_checkpoint), *SMALL, *no_effect, *only, "--uvicorn-log-level", "warning", "--enforce-eager",
        "--block-size", "32", "--return-tokens-as-token-ids", "--root-path", "/api", "--tokenizer",
        str(tiny_checkpoint), "--max_num_batched_tokens", "512", "--disable-fastapi-docs", "--seed", "3")
    for flag in vllm_flags.NO_EFFECT:
        lines = [r for r in caplog.records if r.getMessage().startswith(f"{flag} has no effect in nemoh: ")]
        assert len(lines) == 1, flag
    args = state.engine.engine.args
    assert args.enforce_eager and args.block_size == 32 and args.max_num_batched_tokens == 512 and args.seed == 3
    assert args.tokenizer == str(tiny_checkpoint)
    assert server.config.log_level == "warning" and server.config.root_path == "/api"
    assert state.settings.return_tokens_as_token_ids and not state.settings.api_docs
    assert server.config.app.docs_url is None and server.config.app.openapi_url is None


def test_quantization_must_match_the_checkpoint(capsys):
    from nemoh.cli.common import resolve_model
    from nemoh.cli.serve import check_quantization

    nvfp4 = resolve_model(str(DEMO_DIR / "model-nvfp4"))
    for name in ("modelopt", "modelopt_fp4"):
        check_quantization(name, nvfp4)
    assert cli.main(["serve", str(DEMO_DIR / "model-nvfp4"), "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--quantization fp8: the checkpoint is W4A16_NVFP4" in err and "modelopt or modelopt_fp4" in err


def test_ssl_files_reach_uvicorn(started, tiny_checkpoint, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server, _ = started(str(tiny_checkpoint), *SMALL, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    assert server.config.ssl_keyfile == str(key) and server.config.ssl_certfile == str(cert)


# ---------------------------------------------------------------------------------------------- as a user runs it


def _start(argv: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m nemoh serve ...` with --port 0: returns the process, the base URL from its banner, its log."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nemoh", "serve", *argv], stderr=subprocess.PIPE, text=True,
                            env=env)
    log: list[str] = []
    url = None
    for line in proc.stderr:
        log.append(line)
        if m := re.search(r"URL +(http://\S+)/v1", line):
            url = m.group(1)
            break
    assert url, "".join(log)
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
        time.sleep(0.1)


@needs_demo
def test_readme_openai_example_against_a_quantized_copy_of_the_demo():
    """The README's openai example (tools, no tool_choice) against `nemoh serve <NVFP4 copy>`: auto tool choice
    is on by default for every model, so this is answered (it was a 400 when only the bare demo had it)."""
    from openai import OpenAI

    proc, url, log = _start([str(DEMO_DIR / "model-nvfp4"), "--served-model-name", "nemoh-demo", "--port", "0",
                             "--cache-memory-gb", "0.1", "--max-num-seqs", "4"])
    try:
        assert "quantization W4A16_NVFP4" in "".join(log) and "auto tool choice on" in "".join(log)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        tools = json.loads((REPO / "examples" / "demo_tools.json").read_text())
        r = client.chat.completions.create(
            model="nemoh-demo", tools=tools, max_tokens=256,
            messages=[{"role": "system", "content": "You are the IT helpdesk assistant at Contoso. Use the tools to "
                                                    "help employees."},
                      {"role": "user", "content": "What's the status of INC-4821?"}])
        assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")
        assert httpx.get(url + "/docs").status_code == 200        # FastAPI's page, as vLLM serves it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(log)
