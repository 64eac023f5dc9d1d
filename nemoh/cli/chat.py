"""`nemoh generate` and `nemoh chat`: the engine in a terminal, without a server.

`nemoh chat` renders the checkpoint's chat template with the tools offered (the demo tools and the demo's system
prompt with the demo model), streams the reply with its reasoning set apart, and shows tool calls as calls;
the user types each tool's result (or nothing, to answer the model instead). Ctrl-C stops a reply, Ctrl-D quits.
"""
from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from nemoh.cli.common import DEMO_DIR, Checkpoint, CLIError, add_engine_flags, engine_kwargs, load_chat_template
from nemoh.cli.common import resolve_model

DEMO_TOOLS_FILE = DEMO_DIR / "tools.json"
# the first of the demo corpus's system prompts, with the company of the README's examples
DEMO_COMPANY = "Contoso"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=false")
    _add_sampling_flags(p)
    add_engine_flags(p)
    p.set_defaults(handler=run_generate)
    return p


def add_chat_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--system", default=None,
                   help="system prompt (default: the demo model's own with the demo model, none otherwise)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON list of OpenAI tools to offer (default: the demo tools with the demo model); none offers "
                        "none")
    p.add_argument("--no-thinking", action="store_true", help="start with thinking off (/think toggles)")
    _add_sampling_flags(p)
    add_engine_flags(p)
    p.set_defaults(handler=run_chat)
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


def _sync_engine(ckpt: Checkpoint, kwargs: dict[str, Any]) -> Any:
    from nemoh.engine.llm_engine import LLMEngine

    try:
        return LLMEngine.from_pretrained(ckpt.path, **kwargs)
    except ValueError as e:
        raise CLIError(str(e)) from None


# ---------------------------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ckpt = resolve_model(args.model)
    params = _sampling(args)
    kwargs = engine_kwargs(args, ckpt)
    template = load_chat_template(Path(args.tokenizer or ckpt.path), None) if args.chat else None
    engine = _sync_engine(ckpt, kwargs)
    try:  # a tokenizer-less checkpoint, a prompt longer than the context, a template error
        if template is not None:
            prompt = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     enable_thinking=not args.no_thinking)
            ids = engine.encode(prompt, add_special_tokens=False)
        else:
            ids = engine.encode(prompt)
        engine.add_request("generate-0", prompt_token_ids=ids, params=params)
    except ValueError as e:
        raise CLIError(str(e)) from None
    printed = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------- chat


def chat_tools(flag: str | None, ckpt: Checkpoint) -> list[dict[str, Any]] | None:
    """--tools FILE (OpenAI's tools list), none, or by default the demo tools when chatting with the demo model."""
    if flag is None:
        if not ckpt.is_demo:
            return None
        path = DEMO_TOOLS_FILE
    elif flag.lower() == "none":
        return None
    else:
        path = Path(flag)
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CLIError(f"--tools {flag}: {e.strerror}") from None
    except ValueError as e:
        raise CLIError(f"--tools {flag}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and t["function"].get("name") for t in tools):
        raise CLIError(f"--tools {flag}: expected a JSON list of tools, "
                       '[{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...]')
    return tools or None


def demo_system_prompt() -> str:
    from nemoh.demo.corpus import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS[0].format(company=DEMO_COMPANY)


class CtrlC:
    """Ctrl-C while a reply is generated becomes a flag the loop checks between engine steps: a step cut in the
    middle would leave the request's cache blocks and state slots half-written."""

    def __enter__(self) -> "CtrlC":
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum: int, frame: Any) -> None:
        self.pressed = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


class ReplyView:
    """Prints a reply as it streams: the reasoning after "(thinking)", dimmed on a terminal, then the answer."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.dim = out.isatty()
        self.section: str | None = None

    def show(self, delta: Any) -> None:
        if delta.reasoning:
            self._enter("reasoning")
            self.out.write(delta.reasoning)
        if delta.content:
            text = delta.content if self.section == "content" else delta.content.lstrip()
            if text:
                self._enter("content")
                self.out.write(text)
        self.out.flush()

    def _enter(self, section: str) -> None:
        if section == self.section:
            return
        self.end()
        if section == "reasoning":
            self.out.write((DIM if self.dim else "") + "(thinking) ")
        self.section = section

    def end(self) -> None:
        if self.section is not None:
            self.out.write((RESET if self.dim and self.section == "reasoning" else "") + "\n")
            self.section = None


class ChatSession:
    """The conversation and the engine: `reply()` generates the assistant's next message into the history."""

    def __init__(self, engine: Any, template: Any, params: Any, system: str | None,
                 tools: list[dict[str, Any]] | None, thinking: bool = True, out: TextIO | None = None) -> None:
        self.engine, self.template, self.params, self.tools = engine, template, params, tools
        self.out = out or sys.stdout
        self.system = system
        self.thinking = thinking
        self.history: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self) -> Any:
        """Generate, print and record the next assistant message; returns the parsed reply (None when Ctrl-C
        stopped it: nothing is recorded)."""
        from nemoh.chat import ChatOutputParser

        prompt = self.template.render(self.history, tools=self.tools, add_generation_prompt=True,
                                      enable_thinking=self.thinking)
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_token_ids=self.engine.encode(prompt, add_special_tokens=False),
                                params=self.params)
        parser = ChatOutputParser("super_v3", "qwen3_coder" if self.tools else None, tools=self.tools,
                                  thinking_enabled=self.thinking)
        view = ReplyView(self.out)
        text, error = "", None
        with CtrlC() as ctrl_c:
            while self.engine.has_unfinished_requests():
                if ctrl_c.pressed:
                    self.engine.abort_request(request_id)
                    view.end()
                    self.out.write("(stopped)\n")
                    return None
                for output in self.engine.step():
                    full = output.outputs[0].text
                    if output.request_id == request_id and full.startswith(text):
                        view.show(parser.feed(full[len(text):]))
                        text, error = full, output.error
        view.show(parser.finish())
        view.end()
        if error:
            self.out.write(f"(error: {error})\n")
        parsed = parser.parse(text)
        for call in parsed.tool_calls:
            self.out.write(f"call: {call.name}({call.arguments})\n")
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or ""}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in parsed.tool_calls]
        self.history.append(message)
        return parsed

    def tool_results(self, calls: list[Any]) -> bool:
        """Ask the user for each call's result; True when all were given (the model then goes on). An empty
        line or Ctrl-C leaves the calls unanswered and hands the turn back to the user."""
        for call in calls:
            try:
                result = input(f"result of {call.name}> ").strip()
            except KeyboardInterrupt:
                self.out.write("\n")
                return False
            if not result:
                return False
            self.history.append({"role": "tool", "tool_call_id": call.id, "content": result})
        return True

    def turn(self, line: str) -> None:
        """One user message and the replies it leads to (more than one when tool results are typed in)."""
        mark = len(self.history)
        self.history.append({"role": "user", "content": line})
        while True:
            try:
                parsed = self.reply()
            except ValueError as e:  # a prompt the engine or the template cannot take (longer than the context)
                self.out.write(f"(error: {e})\n")
                parsed = None
            if parsed is None:
                del self.history[mark:]
                return
            if not parsed.tool_calls or not self.tool_results(parsed.tool_calls):
                return


def run_chat(args: argparse.Namespace) -> int:
    ckpt = resolve_model(args.model)
    tools = chat_tools(args.tools, ckpt)
    system = args.system if args.system is not None else demo_system_prompt() if ckpt.is_demo else None
    params = _sampling(args)
    kwargs = engine_kwargs(args, ckpt)
    template = load_chat_template(Path(args.tokenizer or ckpt.path), None)
    engine = _sync_engine(ckpt, kwargs)
    session = ChatSession(engine, template, params, system, tools, thinking=not args.no_thinking)
    print(f"nemoh chat with {ckpt.path}")
    print(f"  system prompt: {system if system else '(none; --system sets one)'}")
    names = ", ".join(t["function"]["name"] for t in tools) if tools else "(none; --tools FILE offers some)"
    print(f"  tools: {names}")
    print("  /think toggles thinking, /reset clears the history, Ctrl-C stops a reply, Ctrl-D or /exit quits.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/think":
            session.thinking = not session.thinking
            print(f"(thinking {'on' if session.thinking else 'off'})")
        elif line == "/reset":
            session.reset()
            print("(history cleared" + ("; the system prompt stays)" if system else ")"))
        elif line:
            try:
                session.turn(line)
            except EOFError:  # Ctrl-D at a tool-result prompt
                print()
                return 0
