"""`nemoh` CLI: flag handling, the demo-model message, SIGTERM drain of a real `nemoh serve`, engine death."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from nemoh import cli
from nemoh.cli import common
from nemoh.chat import ChatTemplate
from nemoh.server.app import build_app
from nemoh.server.runner import ServerThread, make_server
from nemoh.server.settings import ServerSettings

from server_helpers import DEMO_DIR, free_socket, wait_healthy
from server_fakes import ScriptedEngine


def test_unknown_flags_are_errors(capsys):
    assert cli.main(["serve", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--prompt", "hi", "--bogus", "1"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_serve_without_model_explains(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "DEMO_MODEL_DIR", tmp_path)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no MODEL given" in err and "nemoh serve /path/to/" in err
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_engine_flags(tiny_checkpoint, capsys):
    assert cli.main(["serve", str(tiny_checkpoint), "--speculative-config", "{not json"]) == 2
    assert "--speculative-config" in capsys.readouterr().err
    assert cli.main(["serve", str(tiny_checkpoint), "--tensor-parallel-size", "3"]) == 2
    assert cli.main(["serve", str(tiny_checkpoint), "--reasoning-parser", "deepseek_r1"]) == 2
    assert "unknown parser" in capsys.readouterr().err


def test_engine_death_stops_the_server(demo_tokenizer):
    engine = ScriptedEngine(demo_tokenizer)
    holder = {}
    settings = ServerSettings(served_model_names=["m"], health_check_interval=1.0)
    app = build_app(engine, settings, ChatTemplate.from_model_dir(DEMO_DIR),
                    on_engine_dead=lambda: holder["server"].stop_now())
    sock = free_socket()
    host, port = sock.getsockname()
    holder["server"] = server = make_server(app, host, port, log_level="warning")
    thread = ServerThread(server, sock).start()
    assert httpx.get(f"http://{host}:{port}/health").status_code == 200
    engine.healthy = False
    assert httpx.get(f"http://{host}:{port}/health").status_code == 503
    thread.thread.join(3)
    assert not thread.thread.is_alive() and app.state.nemoh.dead


def _read_stream(url: str, body: dict, out: dict, key: str, started: threading.Event) -> None:
    try:
        with httpx.stream("POST", url, json=body, headers={"Authorization": "Bearer k"}, timeout=30) as r:
            out[key] = []
            for line in r.iter_lines():
                if line:
                    out[key].append(line)
                    started.set()
    except httpx.HTTPError as e:
        out[key] = e
    finally:
        started.set()


def test_sigterm_drains_then_exits(tiny_checkpoint):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    drain = 3.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemoh", "serve", str(tiny_checkpoint), "--port", str(port), "--api-key", "k",
         "--max-model-len", "4096", "--cache-memory-gb", "0.05", "--device", "cpu", "--shutdown-timeout", str(drain),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        out: dict = {}
        started = threading.Event(), threading.Event()
        short = threading.Thread(target=_read_stream, args=(base + "/v1/completions",
                                 {"prompt": "a", "max_tokens": 12, "stream": True}, out, "short", started[0]))
        long = threading.Thread(target=_read_stream, args=(base + "/v1/completions",
                                {"prompt": "b", "max_tokens": 3500, "ignore_eos": True, "stream": True}, out, "long",
                                started[1]))
        short.start()
        long.start()
        # both accepted before SIGTERM (a fixed sleep let a loaded machine send them after it, and get 503)
        assert started[0].wait(30) and started[1].wait(30)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        time.sleep(0.2)
        r = httpx.post(base + "/v1/completions", json={"prompt": "new", "max_tokens": 2},
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(base + "/health").status_code == 503
        rc = proc.wait(timeout=drain + 10)
        elapsed = time.time() - t0
        assert rc == 0
        # drain, then uvicorn's 1 s for connections to close, then the interpreter's exit: torch's teardown alone
        # takes 0.75-2 s on the shared 2-core machine (`python -c "import torch"`), whatever nemoh does
        assert elapsed < drain + 5, elapsed
        short.join(5)
        long.join(5)
        assert out["short"][-1] == "data: [DONE]"  # in flight at SIGTERM: finished normally
        last = json.loads(out["short"][-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        # the long one was cut at the drain deadline: aborted in the engine (its stream says so), or the
        # connection closed
        long = out["long"]
        assert isinstance(long, Exception) or long[-1] != "data: [DONE]" or \
            json.loads(long[-2][6:])["choices"][0]["finish_reason"] == "abort"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
