"""`nemoh serve [MODEL]`: the OpenAI-compatible server, with `vllm serve`'s flag names.

The defaults are the same for every checkpoint, the bundled demo model included: MTP speculative decoding (k=3)
whenever the checkpoint has an MTP block, the super_v3 reasoning and qwen3_coder tool parsers, and auto tool
choice whenever a tool parser is set. Everything that can be checked without the model (flags, files, the port)
is checked before it loads; the start-up banner says what is on.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import nemoh
from nemoh.cli import vllm_flags
from nemoh.cli.common import (
    DEMO_MODEL_DIR,
    Checkpoint,
    CLIError,
    add_engine_flags,
    check_memory_plan,
    engine_kwargs,
    load_chat_template,
    resolve_model,
)

logger = logging.getLogger("nemoh.serve")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
GiB = 1024 ** 3


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port; use 1-65535 (0 picks a free one)")
    return port


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible server (vllm serve flags)",
                       description="Serve a Nemotron 3 checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"checkpoint directory (default: the bundled demo model, {DEMO_MODEL_DIR})")
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="the same, as a flag")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port_number, default=8000, help="default 8000; 0 picks a free port")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (env NEMOH_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: nemoh-demo for the demo model, else MODEL as given)")
    p.add_argument("--reasoning-parser", default="super_v3", help="super_v3 (default) or none")
    p.add_argument("--tool-call-parser", default="qwen3_coder", help="qwen3_coder (default) or none")
    p.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=None,
                   help='tool_choice "auto" (the default when a request has tools); on whenever a tool parser is set')
    p.add_argument("--constrain-auto-tool-choice", action=argparse.BooleanOptionalAction, default=True,
                   help='with tool_choice "auto", a call must name an offered tool with valid parameters '
                        "(constrained decoding; default on)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (off: such requests get 400)")
    p.add_argument("--quantization", "-q", default=None,
                   help="must match the checkpoint's own quantization (modelopt, modelopt_fp4, fp8); nemoh "
                        "quantizes nothing on load")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprob tokens as "token_id:N" instead of their text')
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="bound of the waiting queue; requests beyond it get 429")
    p.add_argument("--max-step-seconds", type=float, default=0.25,
                   help="cap each engine step's prefill tokens so that a step takes about this long, adapted to "
                        "the measured step times (aborts and every stream's next token wait for the step in "
                        "progress); 0: no time cap, only --max-num-batched-tokens (default 0.25)")
    p.add_argument("--allowed-origins", nargs="*", default=[],
                   help="CORS origins allowed to call the API (default: none)")
    p.add_argument("--shutdown-timeout", "--drain-timeout", dest="shutdown_timeout", type=float, default=30.0,
                   help="after SIGTERM, new requests get 503 and in-flight ones may finish for this many seconds; "
                        "then the rest are cut and the server exits (--drain-timeout: the same)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 8 MiB)")
    p.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="serve HTTPS with this key (and --ssl-certfile)")
    p.add_argument("--ssl-certfile", default=None, metavar="FILE", help="serve HTTPS with this certificate")
    p.add_argument("--root-path", default="", help="path prefix when behind a proxy that strips it")
    p.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs, /redoc and /openapi.json")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--uvicorn-log-level", default=None, choices=(*LOG_LEVELS, "trace"),
                   help="uvicorn's own log level (default: --log-level)")
    add_engine_flags(p)
    vllm_flags.add_flags(p)
    p.set_defaults(handler=run_serve)
    return p


# ---------------------------------------------------------------------------------------------- checks


def _model_arg(args: argparse.Namespace) -> str | None:
    if args.model is not None and args.model_flag is not None and args.model != args.model_flag:
        raise CLIError(f"two models given, {args.model} and --model {args.model_flag}; pass one")
    return args.model if args.model is not None else args.model_flag


def _parser_name(value: str | None, registry: dict, flag: str) -> str | None:
    if value is None or value.lower() in ("", "none"):
        return None
    if value not in registry:
        raise CLIError(f"{flag} {value}: unknown parser; known: {', '.join(sorted(registry))} or none")
    return value


def server_settings(args: argparse.Namespace, ckpt: Checkpoint, model: str | None) -> Any:
    from nemoh.chat import REASONING_PARSERS, TOOL_PARSERS
    from nemoh.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings

    tool_parser = _parser_name(args.tool_call_parser, TOOL_PARSERS, "--tool-call-parser")
    if args.enable_auto_tool_choice and tool_parser is None:
        raise CLIError("--enable-auto-tool-choice needs a --tool-call-parser (it is none)")
    api_key = args.api_key if args.api_key is not None else os.environ.get("NEMOH_API_KEY")
    default_name = "nemoh-demo" if model is None else model
    try:
        return ServerSettings(
            served_model_names=args.served_model_name or [default_name],
            model_path=str(ckpt.path),
            api_key=api_key or None,
            allowed_origins=list(args.allowed_origins),
            reasoning_parser=_parser_name(args.reasoning_parser, REASONING_PARSERS, "--reasoning-parser"),
            tool_call_parser=tool_parser,
            enable_auto_tool_choice=tool_parser is not None and args.enable_auto_tool_choice is not False,
            constrain_auto_tool_choice=args.constrain_auto_tool_choice,
            trust_request_chat_template=args.trust_request_chat_template,
            max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
            shutdown_timeout=args.shutdown_timeout,
            api_docs=not args.disable_fastapi_docs,
            return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_quantization(flag: str | None, ckpt: Checkpoint) -> None:
    """--quantization names what the checkpoint already is (vLLM's names); nemoh converts nothing on load."""
    if flag is None:
        return
    from nemoh.quant.modelopt import QuantConfig

    try:
        qcfg = QuantConfig.from_model_dir(ckpt.path)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if qcfg is None:
        raise CLIError(f"--quantization {flag}: {ckpt.path} is not quantized and nemoh does not quantize on load; "
                       "leave the flag out, or make a quantized copy first (nemoh quantize SRC DST --format nvfp4)")
    names = {"modelopt"} | ({"modelopt_fp4"} if "NVFP4" in qcfg.quant_algo else set()) | (
        {"fp8", "modelopt_fp8"} if "FP8" in qcfg.quant_algo else set())
    if flag not in names:
        raise CLIError(f"--quantization {flag}: the checkpoint is {qcfg.quant_algo} (ModelOpt); pass "
                       f"{' or '.join(sorted(names))}, or leave the flag out")


def check_ssl(args: argparse.Namespace) -> None:
    if args.ssl_keyfile is None and args.ssl_certfile is None:
        return
    if args.ssl_certfile is None:
        raise CLIError("--ssl-keyfile needs --ssl-certfile (the certificate that goes with the key)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise CLIError(f"--ssl-certfile/--ssl-keyfile: cannot load {args.ssl_certfile} "
                       f"({getattr(e, 'strerror', None) or e})") from None


def listen_socket(host: str, port: int) -> Any:
    """Bind the server's socket now, before the model loads, so a busy or forbidden port is reported at once."""
    import socket

    from nemoh.server.runner import bind_socket

    try:
        return bind_socket(host, port)
    except socket.gaierror as e:
        raise CLIError(f"--host {host}: unknown host ({e.strerror}); use 127.0.0.1, 0.0.0.0 or this machine's "
                       "address") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CLIError(f"--port {port}: {host}:{port} is already in use (another server?); stop it or pick "
                           "another --port") from None
        if e.errno == errno.EACCES:
            raise CLIError(f"--port {port}: permission denied (ports below 1024 need root); pick one above "
                           "1023") from None
        raise CLIError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------- start-up


def banner(ckpt: Checkpoint, settings: Any, engine: Any, load_s: float, url: str) -> str:
    """What is being served and what is on: the lines a user checks first."""
    core = engine.engine
    cfg, runner = core.model_config, core.runner
    qcfg = getattr(core.model, "quant_config", None)
    k = core.num_speculative_tokens
    mtp = f"on, k={k}" if k else "off" if cfg.has_mtp else "off (the checkpoint has no MTP block)"
    auto = "on" if settings.enable_auto_tool_choice else "off"
    kv_tokens = runner.num_kv_blocks * runner.block_size
    kv_gib = runner.num_kv_blocks * runner.bytes_per_block / GiB
    state_gib = runner.num_state_slots * runner.bytes_per_slot / GiB
    snapshot_gib = runner.num_snapshot_slots * runner.bytes_per_slot / GiB
    prefix = (f"on, {runner.num_snapshot_slots} Mamba state snapshots ({snapshot_gib:.3f} GiB, in the cache total)"
              if core.prefix_cache is not None else "off")
    lines = [
        f"nemoh {nemoh.__version__} serving {ckpt.path}",
        f"  served model name   {', '.join(settings.served_model_names)}",
        f"  weights             {str(core.model.dtype).removeprefix('torch.')} on {runner.device}, quantization "
        f"{qcfg.quant_algo if qcfg else 'none'}",
        f"  MTP speculative     {mtp}",
        f"  parsers             reasoning {settings.reasoning_parser or 'none'}, tool calls "
        f"{settings.tool_call_parser or 'none'}, auto tool choice {auto}",
        f"  context             max_model_len {core.max_model_len} (checkpoint {cfg.max_position_embeddings})",
        f"  cache               {runner.num_kv_blocks} KV blocks x {runner.block_size} tokens = {kv_tokens} tokens "
        f"({str(runner.kv_dtype).removeprefix('torch.')}, {kv_gib:.3f} GiB) + {runner.num_state_slots} Mamba "
        f"state slots ({state_gib:.3f} GiB) = {runner.cache_bytes / GiB:.3f} GiB",
        f"  prefix caching      {prefix}",
        f"  memory plan         weights + copies {runner.plan.resident_bytes / GiB:.3f} GiB, step transients "
        f"{runner.plan.transient_bytes / GiB:.3f} GiB, KV {runner.plan.kv_bytes_per_token} B/token, Mamba "
        f"{runner.plan.mamba_bytes_per_seq / 2**20:.2f} MiB/sequence (nemoh plan prints it in full)",
        f"  loaded in           {load_s:.1f} s",
        f"  URL                 {url}/v1" + ("  (API key required)" if settings.api_key else ""),
    ]
    return "\n".join(lines)


def _url(sock: Any, host: str, tls: bool) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def run_serve(args: argparse.Namespace) -> int:
    from nemoh.engine.async_engine import AsyncLLMEngine
    from nemoh.server.app import build_app
    from nemoh.server.runner import make_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = _model_arg(args)
    ckpt = resolve_model(model)
    vllm_flags.check(args)
    settings = server_settings(args, ckpt, model)
    kwargs = engine_kwargs(args, ckpt)
    from nemoh.distributed.launch import torchrun_rank

    rank = torchrun_rank()
    if rank is not None and rank.rank > 0 and args.tensor_parallel_size > 1:
        # under torchrun every process runs `nemoh serve`: rank 0 serves, the others are its workers
        from nemoh.distributed.worker import run_worker
        from nemoh.engine.config import EngineArgs

        run_worker(rank, str(ckpt.path), EngineArgs.from_kwargs(**kwargs))
        return 0
    check_memory_plan(kwargs, ckpt)
    template = load_chat_template(Path(args.tokenizer or ckpt.path), args.chat_template)
    check_quantization(args.quantization, ckpt)
    check_ssl(args)
    sock = listen_socket(args.host, args.port)
    try:
        start = time.monotonic()
        try:
            engine = AsyncLLMEngine.from_pretrained(str(ckpt.path), **kwargs)
        except ValueError as e:  # a checkpoint that does not load, or does not fit the engine arguments
            raise CLIError(str(e)) from None
        load_s = time.monotonic() - start
        # Admission control refuses at once what the engine would only refuse after the template and tokenizer ran.
        settings = dataclasses.replace(settings, max_admitted_requests=engine.max_num_requests)
        holder: dict[str, Any] = {}
        app = build_app(engine, settings, template, on_engine_dead=lambda: holder["server"].stop_now())
        server = holder["server"] = make_server(
            app, args.host, sock.getsockname()[1], log_level=args.uvicorn_log_level or args.log_level,
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, root_path=args.root_path)
        if "*" in settings.allowed_origins:
            logger.warning("--allowed-origins '*': any web page may call this API")
        logger.info("%s", banner(ckpt, settings, engine, load_s, _url(sock, args.host, args.ssl_certfile is not None)))
        try:
            server.run(sockets=[sock])
        finally:
            _shutdown_engine(engine)
    finally:
        sock.close()
    if app.state.nemoh.dead:
        print("nemoh: the engine stopped with a fatal error", file=sys.stderr)
        return 1
    return 0


def _shutdown_engine(engine: Any) -> None:
    asyncio.run(engine.shutdown(0))
