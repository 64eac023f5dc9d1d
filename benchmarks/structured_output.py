"""Structured output on the demo model: validity under hostile schemas, time per token, grammar compile times.

    python benchmarks/structured_output.py --requests 500      # validity table (issue 33)
    python benchmarks/structured_output.py --timing            # time per output token, constrained vs not
    python benchmarks/structured_output.py --compile           # compile time of 50 tools, cold and cached

Validity: requests cycle over tool_choice "required", a named function and response_format json_schema, with
hostile schemas (nested objects, enums, arrays with bounds, anyOf, required / optional mixes, unicode keys), half
with thinking on (reasoning budget 128 tokens, closed as the server closes it), at temperature 1.0 (top_p 1.0), through the engine with the checkpoint's chat template; each
reply goes through the chat output parser (super_v3 + qwen3_coder) and is validated with jsonschema_rs.
"""
from __future__ import annotations

import argparse
import itertools
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nemoh import LLM  # noqa: E402
from nemoh.chat import ChatOutputParser  # noqa: E402
from nemoh.chat.grammar import response_format_constraint, tool_constraint  # noqa: E402
from nemoh.engine.grammar_compiler import GrammarCompiler  # noqa: E402
from nemoh.engine.guided import PendingMasks  # noqa: E402
from nemoh.sampling_params import SamplingParams, StructuredOutput  # noqa: E402

DEMO = REPO / "nemoh" / "demo" / "model"
DEMO_TOOLS = json.loads((REPO / "nemoh" / "demo" / "tools.json").read_text())
HOSTILE_TOOLS = [
    {"type": "function", "function": {"name": "file_ticket", "parameters": {"type": "object", "properties": {
        "title": {"type": "string"},
        "priority": {"enum": ["low", "normal", "high", "urgent"]},
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "reporter": {"type": "object", "properties": {
            "email": {"type": "string"}, "team": {"anyOf": [{"enum": ["it", "hr", "sales"]}, {"type": "null"}]}},
            "required": ["email"], "additionalProperties": False},
        "due_in_days": {"type": "integer", "minimum": 0, "maximum": 60}},
        "required": ["title", "priority"]}}},
    {"type": "function", "function": {"name": "réserver_salle", "parameters": {"type": "object", "properties": {
        "salle": {"enum": ["Étoile", "Océan", "Forêt"]}, "durée_min": {"type": "integer", "minimum": 15,
                                                                           "maximum": 240},
        "participants": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "visio": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
        "required": ["salle", "durée_min"]}}},
]
SCHEMAS = [
    {"type": "object", "properties": {
        "answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 9}, "do": {"type": "string"}},
            "required": ["n", "do"], "additionalProperties": False}, "minItems": 1, "maxItems": 4}},
        "required": ["answer", "steps"], "additionalProperties": False},
    {"type": "object", "properties": {
        "clé_ü": {"enum": ["oui", "non"]},
        "détail": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 20},
                             {"type": "null"}]},
        "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {
            "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, "required": ["b"],
            "additionalProperties": False}}, "required": ["a"], "additionalProperties": False}},
        "required": ["clé_ü", "nested"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tickets": {"type": "array", "items": {"anyOf": [
            {"type": "object", "properties": {"id": {"type": "string", "pattern": "^INC-[0-9]{4}$"},
                                              "status": {"enum": ["open", "closed"]}, "owner": {"type": "string"}},
             "required": ["id", "status"], "additionalProperties": False},
            {"type": "null"}]}, "minItems": 1, "maxItems": 3},
        "total": {"type": "integer", "minimum": 0, "maximum": 100},
        "note": {"type": ["string", "null"], "maxLength": 40}, "ключ": {"type": "boolean"}},
        "required": ["tickets", "ключ"], "additionalProperties": False},
]
PROMPTS = ["My laptop cannot connect to the VPN since this morning.", "Please reset the password for ana@corp.com.",
           "Book a room for the design review tomorrow.", "The printer on floor 3 is jammed again.",
           "Is there an outage on the email server?", "I need access to the sales dashboard."]


def requests(n: int) -> list[dict]:
    tools = DEMO_TOOLS + HOSTILE_TOOLS
    out = []
    for i in range(n):
        kind = ("required", "named", "json_schema")[i % 3]
        # k counts the requests of each kind; thinking alternates with k, and every tool / schema meets both
        k = i // 3
        item = {"kind": kind, "thinking": k % 2 == 0, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
        if kind == "named":
            item["tool"] = tools[k % len(tools)]
        elif kind == "json_schema":
            item["schema"] = SCHEMAS[(k // 2) % len(SCHEMAS)]
        out.append(item)
    return out


class _Reply:
    def __init__(self, text: str, token_ids: list[int], finish_reason: str):
        self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason


class _Output:
    def __init__(self, reply: _Reply):
        self.outputs = [reply]


def generate_with_budget(llm: LLM, prompts, params, thinking: list[bool], budget: int) -> list[_Output]:
    """The server's reasoning budget (server/generation.py), offline: requests with thinking on first run up to
    `budget` tokens; one still thinking then gets "</think>\\n" appended and continues with its constraint resumed
    (StructuredOutput.continued) for the rest of its max_tokens."""
    tokenizer = llm.get_tokenizer()
    close = tokenizer.encode("</think>\n", add_special_tokens=False).ids
    first = [dataclasses.replace(p, max_tokens=min(budget, p.max_tokens)) if t else p for p, t in zip(params, thinking)]
    outs = llm.generate(prompts, first)
    replies = [_Reply(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]
    todo = [i for i, (r, t) in enumerate(zip(replies, thinking))
            if t and r.finish_reason == "length" and len(r.token_ids) < params[i].max_tokens]
    again_prompts, again_params = [], []
    for i in todo:
        r = replies[i]
        if "</think>" not in r.text:                 # the think block still open: the server closes it
            r.token_ids += close
            r.text += "</think>\n"
        again_prompts.append(prompts[i] + r.token_ids)
        again_params.append(dataclasses.replace(params[i], max_tokens=params[i].max_tokens - len(r.token_ids),
                                                structured=params[i].structured.continued(r.token_ids)))
    for i, o in zip(todo, llm.generate(again_prompts, again_params) if todo else []):
        replies[i].text += o.outputs[0].text
        replies[i].token_ids += list(o.outputs[0].token_ids)
        replies[i].finish_reason = o.outputs[0].finish_reason
    return [_Output(r) for r in replies]


def validity(llm: LLM, n: int, max_tokens: int, thinking_budget: int) -> None:
    import jsonschema_rs

    engine, tokenizer = llm.engine, llm.get_tokenizer()
    compiler = engine.grammar_compiler()
    template = llm._template()
    tools = DEMO_TOOLS + HOSTILE_TOOLS
    think_end = tuple(tokenizer.encode("</think>", add_special_tokens=False).ids)
    validators = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in tools}
    items = requests(n)
    prompts, params = [], []
    for it in items:
        messages = [{"role": "user", "content": it["prompt"]}]
        if it["kind"] == "json_schema":
            c = response_format_constraint({"type": "json_schema", "json_schema": {"name": "r", "schema": it["schema"]}})
            text = template.render(messages, add_generation_prompt=True, enable_thinking=it["thinking"])
        else:
            choice = "required" if it["kind"] == "required" else {"type": "function", "function": {
                "name": it["tool"]["function"]["name"]}}
            c = tool_constraint(tools, choice, None, compiler.marker)
            text = template.render(messages, tools=tools, add_generation_prompt=True, enable_thinking=it["thinking"])
        structured = StructuredOutput(c.grammar, c.param, think_end if it["thinking"] else ())
        prompts.append(tokenizer.encode(text, add_special_tokens=False).ids)
        params.append(SamplingParams(temperature=1.0, top_p=1.0, seed=it["seed"], max_tokens=max_tokens,
                                     structured=structured))
    start = time.perf_counter()
    outs = generate_with_budget(llm, prompts, params, [it["thinking"] for it in items], thinking_budget)
    elapsed = time.perf_counter() - start
    table: dict[tuple, dict] = defaultdict(lambda: defaultdict(int))
    failures = []
    for it, out in zip(items, outs):
        c = out.outputs[0]
        label = f"json_schema {SCHEMAS.index(it['schema'])}" if it["kind"] == "json_schema" else it["kind"]
        row = table[(label, it["thinking"])]
        row["n"] += 1
        row["tokens"] += len(c.token_ids)
        row[f"finish_{c.finish_reason}"] += 1
        parser = ChatOutputParser("super_v3", "qwen3_coder", tools=tools, thinking_enabled=it["thinking"])
        parsed = parser.parse(c.text)
        row["reasoning"] += bool(parsed.reasoning)
        try:
            if it["kind"] == "json_schema":
                ok = jsonschema_rs.validator_for(it["schema"]).is_valid(json.loads(parsed.content or ""))
            else:
                names = validators if it["kind"] == "required" else {it["tool"]["function"]["name"]}
                ok = bool(parsed.tool_calls) and all(
                    tc.name in names and validators[tc.name].is_valid(json.loads(tc.arguments))
                    for tc in parsed.tool_calls)
        except ValueError:
            ok = False
        row["valid"] += ok
        row["valid_stop"] += ok and c.finish_reason == "stop"
        if not ok:
            failures.append((it["kind"], c.finish_reason, c.text[-300:]))
    total = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{n} requests, {total} tokens in {elapsed:.0f} s ({total / elapsed:.0f} tok/s), temperature 1.0")
    print("| constraint | thinking | requests | valid | finished (stop) | valid of finished | cut by max_tokens "
          "(length) | reasoning present | mean tokens |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for (kind, thinking), row in sorted(table.items()):
        stop = row["finish_stop"]
        print(f"| {kind} | {'on' if thinking else 'off'} | {row['n']} | {row['valid']} ({100 * row['valid'] / row['n']:.0f}%)"
              f" | {stop} | {row['valid_stop']} ({100 * row['valid_stop'] / max(stop, 1):.0f}%) | {row['finish_length']}"
              f" | {row['reasoning']} | {row['tokens'] / row['n']:.0f} |")
    # an invalid reply that ended by itself is a bug; one cut by max_tokens is expected (an unbounded value)
    for f in sorted(failures, key=lambda f: f[1] != "stop")[:5]:
        print("INVALID", f)


_BATCHES = itertools.count()


def decode_time(llm: LLM, prompt: list[int],
                params: list[SamplingParams]) -> tuple[float, float, int, list[int]]:
    """Drive the engine over one batch: the wall-clock and the CPU seconds (of this process, all its threads) of
    its decode steps alone (from the first step after every sequence has its first token, so the prefill is left
    out), the tokens those steps made, and each sequence's number of output tokens."""
    engine = llm.engine
    batch = next(_BATCHES)
    ids = [f"timing-{batch}-{i}" for i in range(len(params))]
    for request_id, p in zip(ids, params):
        engine.add_request(request_id, prompt_token_ids=prompt, params=p)
    counts: dict[str, int] = {}
    finished: set[str] = set()
    start, cpu_start, before = None, 0.0, 0
    while len(finished) < len(ids):
        if start is None and len(counts) == len(ids):
            start, cpu_start, before = time.perf_counter(), time.process_time(), sum(counts.values())
        for out in engine.step():
            if out.outputs[0].token_ids:
                counts[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                finished.add(out.request_id)
    if start is None:
        raise RuntimeError("the batch finished before every sequence had decoded")
    return (time.perf_counter() - start, time.process_time() - cpu_start, sum(counts.values()) - before,
            [counts.get(r, 0) for r in ids])


def timing(llm: LLM, rounds: int, batch: int, max_tokens: int) -> None:
    """Decode time per output token with a constraint vs without, on the same prompt (the demo's and the hostile
    tools, thinking off), at temperature 1.0 with EOS ignored.

    A constrained reply ends when its grammar completes, often before max_tokens; comparing it with unconstrained
    replies of max_tokens would compare batches that shrink differently. So each constraint's baseline is the
    same batch unconstrained, each sequence stopped at the length its constrained reply had (the seeds are fixed,
    so each round repeats those lengths; the warm-up round 0 measures them and compiles the grammars). The two
    sides of each pair alternate, their order reversed every other round; medians of the rounds. The time per
    token of one sequence is elapsed x batch / tokens, where tokens are those of the decode steps."""
    tokenizer = llm.get_tokenizer()
    tools = DEMO_TOOLS + HOSTILE_TOOLS
    compiler = llm.engine.grammar_compiler()
    text = llm._template().render([{"role": "user", "content": PROMPTS[0]}], tools=tools, add_generation_prompt=True,
                                  enable_thinking=False)
    prompt = tokenizer.encode(text, add_special_tokens=False).ids
    constraints = {
        "json_object": response_format_constraint({"type": "json_object"}),
        "json_schema": response_format_constraint({"type": "json_schema", "json_schema": {"name": "r",
                                                                                           "schema": SCHEMAS[0]}}),
        "required": tool_constraint(tools, "required", None, compiler.marker),
    }

    def params(c, lengths):
        return [SamplingParams(temperature=1.0, max_tokens=n, seed=i, ignore_eos=True,
                               structured=StructuredOutput(c.grammar, c.param) if c else None)
                for i, n in enumerate(lengths)]

    lengths = {name: decode_time(llm, prompt, params(c, [max_tokens] * batch))[3] for name, c in constraints.items()}
    decode_time(llm, prompt, params(None, [max_tokens] * batch))
    masks = llm.engine.grammar_masks
    ahead = masks.start
    sides = ("unconstrained", "masks during the forward", "masks after the forward")
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    cpu_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in range(rounds):
        for name, c in constraints.items():
            for side in (sides if r % 2 else sides[::-1]):
                # "after": the worker thread is bypassed, so each step's masks are computed when sampling needs them
                masks.start = ahead if side != sides[2] else (lambda jobs: PendingMasks(None))
                try:
                    elapsed, cpu, tokens, _ = decode_time(llm, prompt, params(c if side != sides[0] else None, lengths[name]))
                finally:
                    masks.start = ahead
                times[name, side].append(elapsed * batch / tokens)
                cpu_times[name, side].append(cpu * batch / tokens)
    print(f"batch {batch}, max_tokens {max_tokens}, prompt {len(prompt)} tokens, temperature 1.0: decode ms per "
          f"output token of one sequence, wall-clock / CPU time of the process, medians of {rounds} rounds")
    print("| constraint | mean output tokens | unconstrained, same lengths | constrained | ratio | constrained, masks "
          "after the forward | ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name in constraints:
        wall = [statistics.median(times[name, side]) for side in sides]
        cpu = [statistics.median(cpu_times[name, side]) for side in sides]
        cell = lambda i: f"{1e3 * wall[i]:.2f} / {1e3 * cpu[i]:.2f}"  # noqa: E731
        ratio = lambda i: f"{wall[i] / wall[0]:.2f}x / {cpu[i] / cpu[0]:.2f}x"  # noqa: E731
        print(f"| {name} | {statistics.mean(lengths[name]):.0f} | {cell(0)} | {cell(1)} | {ratio(1)} | {cell(2)} | "
              f"{ratio(2)} |")


def compile_times(llm: LLM, num_tools: int) -> None:
    tools = [{"type": "function", "function": {**t["function"], "name": f"{t['function']['name']}_{i}"}}
             for i in range(num_tools) for t in [(DEMO_TOOLS + HOSTILE_TOOLS)[i % 9]]]
    tokenizer = llm.get_tokenizer()
    compiler = GrammarCompiler.from_tokenizer(tokenizer, llm.engine.model_config.vocab_size, llm.engine.eos_token_ids)
    start = time.perf_counter()
    c = tool_constraint(tools, "required", None, compiler.marker)
    built = time.perf_counter() - start
    start = time.perf_counter()
    compiler.matcher(c.grammar, c.param)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(20):
        start = time.perf_counter()
        compiler.matcher(c.grammar, c.param)
        warm.append(time.perf_counter() - start)
    print(f"{num_tools} tools: grammar text {len(c.grammar)} chars built in {1e3 * built:.1f} ms; compile "
          f"{1e3 * cold:.1f} ms cold, {1e3 * statistics.median(warm):.2f} ms from the cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--thinking-budget", type=int, default=128, help="max_thinking_tokens of thinking requests")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timing-max-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--num-tools", type=int, default=50)
    args = ap.parse_args()
    llm = LLM(args.model, dtype="float32", max_model_len=4096, max_num_seqs=32)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} threads, load average "
          f"{load_average()}")
    if args.requests:
        validity(llm, args.requests, args.max_tokens, args.thinking_budget)
    if args.timing:
        timing(llm, args.rounds, args.batch, args.timing_max_tokens)
    if args.compile:
        compile_times(llm, args.num_tools)
    print(f"load average at the end {load_average()}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
