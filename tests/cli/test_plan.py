"""`nemoh plan`: the memory plan from config.json alone, and its one-line errors; `nemoh serve` refuses a
context that does not fit before it loads any weight."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemoh import cli

from test_errors import error_line  # noqa: E402  (tests/cli is on the path, as for test_errors)

REPO = Path(__file__).resolve().parents[2]
SUPER_NVFP4 = REPO / "benchmarks" / "configs" / "super-nvfp4"
DEMO = REPO / "nemoh" / "demo" / "model"


def test_plan_for_super_on_one_h200(capsys):
    """The directory holds config.json and hf_quant_config.json only: no weight is read."""
    assert not list(SUPER_NVFP4.glob("*.safetensors"))
    rc = cli.main(["plan", str(SUPER_NVFP4), "--gpu-memory-gib", "131.3", "--kv-cache-dtype", "fp8",
                   "--max-model-len", "1048576", "--max-num-seqs", "32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "parameters 123.61B" in out and "routed experts" in out and "(nvfp4)" in out
    assert "4,608 bytes per token" in out and "MTP verify states" in out
    assert " 1048576 tokens: " in out


def test_plan_errors_are_one_line(capsys, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    error_line(capsys, cli.main(["plan", str(llama)]), "not a NemotronH checkpoint")
    error_line(capsys, cli.main(["plan", str(tmp_path / "missing")]), "no such checkpoint directory")
    line = error_line(capsys, cli.main(["plan", str(DEMO), "--gpu-memory-gib", "0.5", "--max-model-len",
                                        "50000000"]), "--max-model-len 50000000 does not fit", "at most --max-model-len")
    longest = int(line.rsplit("at most --max-model-len ", 1)[1].split()[0])
    assert cli.main(["plan", str(DEMO), "--gpu-memory-gib", "0.5", "--max-model-len", str(longest)]) == 0
    capsys.readouterr()
    error_line(capsys, cli.main(["plan", str(DEMO), "--gpu-memory-gib", "0.001"]), "the model does not fit")


@pytest.fixture
def no_loading(monkeypatch):
    from nemoh.engine.async_engine import AsyncLLMEngine

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(AsyncLLMEngine, "from_pretrained", refuse)


def test_serve_refuses_a_context_that_does_not_fit_before_loading(capsys, tiny_checkpoint, no_loading):
    error_line(capsys, cli.main(["serve", str(tiny_checkpoint), "--device", "cpu", "--max-model-len", "900000000",
                                 "--port", "0"]), "--max-model-len 900000000 does not fit", "at most --max-model-len")
