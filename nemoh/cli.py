"""The `nemoh` command: serve, generate, chat, quantize, bench, train.

`nemoh serve` takes vLLM's flag names where they apply, so a `vllm serve` line from a model card works with
the flags nemoh has; an unknown flag is an error, never silently ignored. `quantize` and `train` hand their
arguments to `nemoh.quant.quantize.main` and `nemoh.demo.train.main`; `bench` runs a script from
`benchmarks/`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import sys
from pathlib import Path
from typing import Any

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
# The bundled demo model is served with everything on: tool calls (auto) and MTP speculative decoding. It
# computes in its checkpoint's dtype, bfloat16, on a CPU too: with MTP, bfloat16 decodes faster than float32
# (a 4-token verification costs 1.3-1.4 plain forwards in bfloat16, 1.85 in float32); without MTP float32 is
# about as fast or a little faster (README, "The demo model").
DEMO_SPECULATIVE_CONFIG = {"method": "mtp", "num_speculative_tokens": 3}
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
PASS_THROUGH = ("quantize", "train", "bench")


class CLIError(Exception):
    """A user mistake: printed as `nemoh: error: ...`, exit status 2."""


# ---------------------------------------------------------------------------------------------- model


def has_weights(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def resolve_model(model: str | None) -> Path:
    """The model directory to load; with no MODEL the bundled demo model, if its weights are there."""
    if model is None:
        if not has_weights(DEMO_MODEL_DIR):
            raise CLIError(
                f"no MODEL given and the bundled demo model at {DEMO_MODEL_DIR} has no weights.\n"
                "  Pass a checkpoint directory:  nemoh serve /path/to/Nemotron-3-checkpoint\n"
                "  or train the demo model first: nemoh train"
            )
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CLIError(f"model directory {model!r} does not exist (nemoh loads local checkpoints only)")
    if not has_weights(path):
        raise CLIError(f"{model!r} has no config.json and *.safetensors weights")
    return path


def _speculative_config(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CLIError(f"--speculative-config is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CLIError('--speculative-config must be a JSON object such as {"method":"mtp","num_speculative_tokens":3}')
    return value


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="weights/activations dtype: auto, bfloat16, float16, float32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, bfloat16, float16, float32")
    g.add_argument("--mamba-ssm-cache-dtype", default=None, help="float32 (default), float16, bfloat16")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='e.g. \'{"method":"mtp","num_speculative_tokens":3}\'')
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--cache-memory-gb", type=float, default=None, help="memory for KV blocks + Mamba state slots")
    g.add_argument("--cpu-packed-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: oneDNN-packed copies of the weights of 131072+ elements (faster; more memory). Default on")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="only 1 is supported")
    g.add_argument("--seed", type=int, default=None)


def apply_demo_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`nemoh serve` without MODEL: MTP on unless a flag says otherwise."""
    kwargs.setdefault("speculative_config", DEMO_SPECULATIVE_CONFIG)
    return kwargs


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.tensor_parallel_size != 1:
        raise CLIError("--tensor-parallel-size: nemoh runs on one device; only 1 is supported")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"dtype": args.dtype, "device": device, "kv_cache_dtype": args.kv_cache_dtype}
    optional = {
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "mamba_ssm_cache_dtype": args.mamba_ssm_cache_dtype,
        "speculative_config": _speculative_config(args.speculative_config),
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "cache_memory_gb": args.cache_memory_gb,
        "cpu_packed_weights": args.cpu_packed_weights,
        "seed": args.seed,
        "max_waiting_requests": getattr(args, "max_waiting_requests", None),
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


# ---------------------------------------------------------------------------------------------- serve


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible server (vllm serve flags)",
                       description="Serve a Nemotron 3 checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"checkpoint directory (default: the bundled demo model, {DEMO_MODEL_DIR})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (env NEMOH_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use")
    p.add_argument("--reasoning-parser", default="super_v3", help="super_v3 (default) or none")
    p.add_argument("--tool-call-parser", default="qwen3_coder", help="qwen3_coder (default) or none")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (the default when a request has tools)')
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (off: such requests get 400)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="bound of the waiting queue; requests beyond it get 429")
    p.add_argument("--allowed-origins", nargs="*", default=[],
                   help="CORS origins allowed to call the API (default: none)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGTERM")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 8 MiB)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_engine_flags(p)
    return p


def _parser_name(value: str | None, registry: dict, flag: str) -> str | None:
    if value is None or value.lower() in ("", "none"):
        return None
    if value not in registry:
        raise CLIError(f"{flag}: unknown parser {value!r}; known: {sorted(registry)}")
    return value


def _chat_template(model_dir: Path, template_file: str | None) -> Any:
    from nemoh.chat import ChatTemplate, TemplateError

    try:
        if template_file is None:
            return ChatTemplate.from_model_dir(model_dir)
        source = Path(template_file).read_text(encoding="utf-8")
        special = ChatTemplate.from_model_dir(model_dir).special_tokens if (
            (model_dir / "chat_template.jinja").is_file() or (model_dir / "tokenizer_config.json").is_file()
        ) else {}
        return ChatTemplate(source, special_tokens=special)
    except OSError as e:
        raise CLIError(f"--chat-template: {e}") from None
    except TemplateError as e:
        raise CLIError(f"chat template: {e}") from None


def build_engine(model_dir: Path, kwargs: dict[str, Any]) -> Any:
    from nemoh.engine.async_engine import AsyncLLMEngine

    try:
        return AsyncLLMEngine.from_pretrained(str(model_dir), **kwargs)
    except ValueError as e:  # invalid engine arguments, or a checkpoint that does not fit them
        raise CLIError(str(e)) from None


def run_serve(args: argparse.Namespace) -> int:
    from nemoh.chat import REASONING_PARSERS, TOOL_PARSERS
    from nemoh.server.app import build_app
    from nemoh.server.runner import make_server
    from nemoh.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = resolve_model(args.model)
    api_key = args.api_key if args.api_key is not None else os.environ.get("NEMOH_API_KEY")
    try:
        settings = ServerSettings(
            served_model_names=args.served_model_name or [args.model or "nemoh-demo"],
            model_path=str(model_dir),
            api_key=api_key or None,
            allowed_origins=list(args.allowed_origins),
            reasoning_parser=_parser_name(args.reasoning_parser, REASONING_PARSERS, "--reasoning-parser"),
            tool_call_parser=_parser_name(args.tool_call_parser, TOOL_PARSERS, "--tool-call-parser"),
            enable_auto_tool_choice=args.enable_auto_tool_choice or args.model is None,
            trust_request_chat_template=args.trust_request_chat_template,
            max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
            drain_timeout=args.drain_timeout,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.enable_auto_tool_choice and settings.tool_call_parser is None:
        raise CLIError("--enable-auto-tool-choice needs a --tool-call-parser")
    template = _chat_template(model_dir, args.chat_template)
    kwargs = engine_kwargs(args)
    if args.model is None:
        apply_demo_defaults(kwargs)
    engine = build_engine(model_dir, kwargs)
    holder: dict[str, Any] = {}

    def on_engine_dead() -> None:
        holder["server"].stop_now()

    app = build_app(engine, settings, template, on_engine_dead=on_engine_dead)
    server = make_server(app, args.host, args.port, log_level=args.log_level)
    holder["server"] = server
    if "*" in settings.allowed_origins:
        logging.getLogger("nemoh.server").warning("--allowed-origins '*': any web page may call this API")
    try:
        server.run()
    finally:
        _shutdown_engine(engine)
    if app.state.nemoh.dead:
        print("nemoh: the engine stopped with a fatal error", file=sys.stderr)
        return 1
    return 0


def _shutdown_engine(engine: Any) -> None:
    import asyncio
    import inspect

    result = engine.shutdown(0)
    if inspect.isawaitable(result):
        asyncio.run(result)


# ---------------------------------------------------------------------------------------------- generate / chat


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=false")
    _add_sampling_flags(p)
    _add_engine_flags(p)
    return p


def add_chat_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-thinking", action="store_true", help="start with thinking off (/think toggles)")
    _add_sampling_flags(p)
    _add_engine_flags(p)
    return p


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)


def _sampling(args: argparse.Namespace) -> Any:
    from nemoh.sampling_params import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _sync_engine(args: argparse.Namespace) -> Any:
    from nemoh.engine.llm_engine import LLMEngine

    model_dir = resolve_model(args.model)
    kwargs = engine_kwargs(args)
    kwargs.pop("max_waiting_requests", None)
    try:
        return model_dir, LLMEngine.from_pretrained(model_dir, **kwargs)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _stream(engine: Any, prompt_ids: list[int], params: Any, request_id: str) -> str:
    """Generate and print as text arrives; returns the whole text."""
    engine.add_request(request_id, prompt_token_ids=prompt_ids, params=params)
    printed = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            text = out.outputs[0].text
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    sys.stdout.write("\n")
    return printed


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model_dir, engine = _sync_engine(args)
    params = _sampling(args)
    if args.chat:
        template = _chat_template(model_dir, None)
        prompt = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                 enable_thinking=not args.no_thinking)
        ids = engine.encode(prompt, add_special_tokens=False)
    else:
        ids = engine.encode(prompt)
    try:
        _stream(engine, ids, params, "generate-0")
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from nemoh.chat import ChatOutputParser

    model_dir, engine = _sync_engine(args)
    template = _chat_template(model_dir, None)
    params = _sampling(args)
    thinking = not args.no_thinking
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    print("nemoh chat: /think toggles thinking, /reset clears the history, /exit or Ctrl-D quits.")
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/think":
            thinking = not thinking
            print(f"(thinking {'on' if thinking else 'off'})")
            continue
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = template.render(history, add_generation_prompt=True, enable_thinking=thinking)
        ids = engine.encode(prompt, add_special_tokens=False)
        sys.stdout.write("assistant> ")
        try:
            text = _stream(engine, ids, params, f"chat-{turn}")
        except ValueError as e:
            print(f"\n(error: {e})")
            history.pop()
            continue
        turn += 1
        parsed = ChatOutputParser("super_v3", None, thinking_enabled=thinking).parse(text)
        history.append({"role": "assistant", "content": parsed.content or "",
                        "reasoning_content": parsed.reasoning})


# ---------------------------------------------------------------------------------------------- pass-through


def run_bench(argv: list[str]) -> int:
    scripts = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("_"))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nemoh bench SCRIPT [ARGS...]\n\nruns benchmarks/SCRIPT.py (or a path to a script)")
        print("scripts: " + (", ".join(scripts) if scripts else f"(none found in {BENCHMARKS_DIR})"))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    path = Path(name) if name.endswith(".py") else BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise CLIError(f"no benchmark script {name!r}; available: {', '.join(scripts) or 'none'}")
    saved = sys.argv
    sys.argv = [str(path), *rest]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def run_pass_through(command: str, argv: list[str]) -> int:
    if command == "quantize":
        from nemoh.quant.quantize import main
    elif command == "train":
        from nemoh.demo.train import main
    else:
        return run_bench(argv)
    result = main(argv)
    return int(result or 0)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemoh", description="Inference and serving for Nemotron 3 hybrid models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_chat_parser(sub)
    sub.add_parser("quantize", help="quantize a checkpoint to NVFP4/FP8 (nemoh quantize --help)", add_help=False)
    sub.add_parser("train", help="train the bundled demo model (nemoh train --help)", add_help=False)
    sub.add_parser("bench", help="run a benchmark script from benchmarks/", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in PASS_THROUGH:
            return run_pass_through(argv[0], argv[1:])
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a usage error argparse has already printed
            return e.code if isinstance(e.code, int) else 2
        handlers = {"serve": run_serve, "generate": run_generate, "chat": run_chat}
        return handlers[args.command](args)
    except CLIError as e:
        print(f"nemoh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
