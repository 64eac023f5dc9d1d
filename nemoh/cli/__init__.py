"""The `nemoh` command: serve, generate, chat, quantize, plan, train, bench (one module per command).

A user mistake is one line on stderr, `nemoh: error: ...`, naming the flag or file and what to do, with exit
status 2; never a traceback. `nemoh serve` takes `vllm serve`'s flags (vllm_flags.py lists those that change
nothing here). `train` and `bench` hand their arguments to `nemoh.demo.train` and a script in `benchmarks/`.
"""
from __future__ import annotations

import os
import re
import sys
import warnings

# torch warns when it is imported without numpy; nemoh does not use numpy (it is no dependency), so a new user's
# first command must not open with "Failed to initialize NumPy". Set before any command imports torch.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
# PyTorch's OpenMP threads sleep between parallel regions instead of spinning (read once, when torch loads
# libgomp). On a machine with more runnable threads than cores, spinning threads take the cores that the
# threads they wait for need: a 2,048-token prefill of the demo model took 2.1-8.3 s spinning and 0.4-0.7 s
# sleeping on 2 shared cores at load 6 (docs/reliability.md). An OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import nemoh  # noqa: E402  (after the filter)
from nemoh.cli import chat, plan, quantize, serve  # noqa: E402
from nemoh.cli.common import CLIError, CLIParser, UsageError  # noqa: E402

PASS_THROUGH = ("train", "bench")
COMMANDS = ("serve", "generate", "chat", "quantize", "plan", *PASS_THROUGH)


def build_parser() -> CLIParser:
    parser = CLIParser(prog="nemoh", description="Inference and serving for Nemotron 3 hybrid models.")
    parser.add_argument("--version", action="version", version=f"nemoh {nemoh.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_parser(sub)
    chat.add_generate_parser(sub)
    chat.add_chat_parser(sub)
    quantize.add_parser(sub)
    plan.add_parser(sub)
    sub.add_parser("train", help="train the bundled demo model (nemoh train --help)", add_help=False)
    sub.add_parser("bench", help="run a benchmark script from benchmarks/", add_help=False)
    return parser


def dashed(argv: list[str]) -> list[str]:
    """vLLM's parser takes `--max_model_len` for `--max-model-len`; so does nemoh (flag names only)."""
    return [re.sub(r"^--[^=]+", lambda m: m.group(0).replace("_", "-"), a) if a.startswith("--") else a
            for a in argv]


def _run_pass_through(command: str, argv: list[str]) -> int:
    if command == "train":
        from nemoh.demo.train import main as train

        return int(train(argv) or 0)
    from nemoh.cli.bench import run_bench

    return run_bench(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if command in PASS_THROUGH:
            return _run_pass_through(command, argv[1:])
        args = build_parser().parse_args(dashed(argv))
        return args.handler(args)
    except UsageError as e:
        print(f"nemoh: error: {e} (see `nemoh {command + ' ' if command else ''}--help`)", file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"nemoh: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("\nnemoh: interrupted", file=sys.stderr)
        return 130
