"""`vllm serve` flags that change nothing in nemoh, or that it supports with one value only.

So that a `vllm serve` line from a model card runs as written, nemoh accepts these instead of calling them
unrecognized. The flags that work are ordinary options of `nemoh serve` (serve.py, common.py); the ones here are
in three tables, each with its reason:
- NO_EFFECT: accepted; each one given is logged once at start-up, with why it changes nothing here;
- ONLY: the value nemoh supports is accepted, any other is an error;
- REFUSED: always an error.
vLLM's spelling with underscores (`--max_model_len`) is accepted too (see nemoh.cli.main).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from nemoh.cli.common import CLIError

logger = logging.getLogger("nemoh.cli")

SWITCH, VALUE, ON_OFF = "switch", "value", "on/off"   # --flag, --flag VALUE, --flag / --no-flag

NO_EFFECT: dict[str, tuple[str, str]] = {
    "--trust-remote-code": (SWITCH, "nemoh runs its own NemotronH code, never code shipped with a checkpoint"),
    "--disable-log-requests": (SWITCH, "nemoh does not log requests"),
    "--enable-log-requests": (SWITCH, "nemoh does not log requests"),
    "--max-log-len": (VALUE, "nemoh does not log prompts"),
    "--disable-log-stats": (SWITCH, "nemoh logs no periodic statistics (they are at GET /metrics)"),
    "--disable-uvicorn-access-log": (SWITCH, "nemoh writes no access log"),
    "--tokenizer-mode": (VALUE, "nemoh reads the checkpoint's tokenizer.json with the tokenizers library"),
    "--revision": (VALUE, "nemoh loads local directories only; there is no revision to pick"),
    "--download-dir": (VALUE, "nemoh never downloads"),
    "--swap-space": (VALUE, "nemoh swaps no KV blocks to the CPU: a request that does not fit waits"),
    "--disable-custom-all-reduce": (SWITCH, "nemoh runs on one device: there is no all-reduce"),
    "--distributed-executor-backend": (VALUE, "nemoh runs on one device, in one process"),
    "--disable-frontend-multiprocessing": (SWITCH, "nemoh's server and engine share one process"),
    "--async-scheduling": (SWITCH, "nemoh's engine runs its steps on its own thread already"),
    "--attention-backend": (VALUE, "nemoh has one attention implementation"),
    "--guided-decoding-backend": (VALUE, "nemoh always uses llguidance for constrained decoding"),
    "--enable-reasoning": (SWITCH, "reasoning is split from content whenever --reasoning-parser is set"),
    "--reasoning-parser-plugin": (VALUE, "nemoh never loads parser code from a file; its own parsers are used"),
    "--tool-parser-plugin": (VALUE, "nemoh never loads parser code from a file; its own parsers are used"),
}

ONLY: dict[str, tuple[type, tuple[Any, ...], str]] = {
    "--pipeline-parallel-size": (int, (1,), "nemoh runs on one device"),
    "--data-parallel-size": (int, (1,), "nemoh runs one engine"),
    "--load-format": (str, ("auto", "safetensors"), "nemoh loads safetensors only, never pickle"),
    "--response-role": (str, ("assistant",), "nemoh's replies have the role assistant"),
    "--chat-template-content-format": (str, ("auto", "string"),
                                       "nemoh passes message content to the template as a string"),
}

REFUSED: dict[str, str] = {
    "--middleware": "nemoh imports no code named on the command line; put a proxy in front of it instead",
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM flags that change nothing in nemoh, take one value, or are refused "
                             "(accepted so that vLLM command lines run)")
    for flag, (kind, why) in NO_EFFECT.items():
        if kind == SWITCH:
            g.add_argument(flag, action="store_true", default=None, help=f"no effect: {why}")
        elif kind == ON_OFF:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"no effect: {why}")
        else:
            g.add_argument(flag, default=None, metavar="VALUE", help=f"no effect: {why}")
    for flag, (kind, values, why) in ONLY.items():
        g.add_argument(flag, type=kind, default=None, metavar="VALUE",
                       help=f"{' or '.join(map(str, values))} only: {why}")
    for flag, why in REFUSED.items():
        g.add_argument(flag, action="append", default=None, metavar="VALUE", help=f"refused: {why}")


def check(args: argparse.Namespace) -> None:
    """Refuse what nemoh cannot do, then log one line for each flag given that changes nothing."""
    for flag, why in REFUSED.items():
        if getattr(args, _dest(flag)) is not None:
            raise CLIError(f"{flag}: not supported: {why}")
    for flag, (_, values, why) in ONLY.items():
        value = getattr(args, _dest(flag))
        if value is not None and value not in values:
            raise CLIError(f"{flag} {value}: only {' or '.join(map(str, values))} is supported ({why})")
    for flag, (_, why) in NO_EFFECT.items():
        if getattr(args, _dest(flag)) is not None:
            logger.info("%s has no effect in nemoh: %s", flag, why)
