"""Evaluate the bundled demo model on held-out IT tickets, through the engine with the real template and parsers.

Table 1 (as the model card's BF16 / FP8 / NVFP4 columns): on held-out examples whose next assistant turn
is a tool call: rate of replies with a parseable tool call, rate choosing the right tool, rate with exactly
the right arguments; on examples whose next turn needs no tool: rate of correct no-tool replies (no call,
non-empty content). Below it, the same replies broken down: each argument's value, and answers after a tool
result against the reference answer. FP8 and NVFP4 copies are written with `nemoh quantize` into a temporary
directory (FP8 calibrated on training-split text, NVFP4 weight-only).

Table 2, for each compute dtype (bfloat16, as served, and float32): MTP speculative decoding at k = 1, 2, 3
against no MTP: mean acceptance rate, tokens per verify step, and single-stream decode speed (one request at
a time, greedy, same prompts; time per output token after the first, as serving benchmarks measure it), with
the speed-up; then each dtype's k=0 and k=3 against the other dtype's k=0.

Usage: python benchmarks/demo_eval.py [--model DIR] [--n 200] [--speed-n 12] [--formats bf16,fp8,nvfp4]
       [--speed-dtypes bfloat16,float32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nemoh import LLM, SamplingParams
from nemoh.chat.output_parser import ChatOutputParser
from nemoh.chat.template import ChatTemplate
from nemoh.demo.corpus import generate, render
from nemoh.quant.quantize import quantize_checkpoint

DEMO_DIR = Path(__file__).resolve().parent.parent / "nemoh" / "demo" / "model"


def prompts_for(examples, model_dir: Path) -> list[str]:
    template = ChatTemplate.from_model_dir(model_dir)
    return [template.render(ex.messages[:-1], tools=ex.tools, add_generation_prompt=True, **ex.template_kwargs)
            for ex in examples]


def score(examples, texts: list[str]) -> dict[str, float]:
    tool_total = tool_parsed = tool_right = args_right = 0
    none_total = none_right = 0
    fields: dict[str, list[int]] = {}       # argument -> [right, total], over calls that name the right tool
    final_total = final_right = 0           # answers after a tool result: the reference answer, exactly
    for ex, text in zip(examples, texts):
        parser = ChatOutputParser("super_v3", "qwen3_coder", tools=ex.tools,
                                  thinking_enabled=ex.template_kwargs.get("enable_thinking", True))
        parsed = parser.parse(text)
        if ex.expected["type"] == "tool_call":
            tool_total += 1
            if parsed.tool_calls:
                tool_parsed += 1
                call = parsed.tool_calls[0]
                if call.name == ex.expected["name"]:
                    tool_right += 1
                    arguments = json.loads(call.arguments)
                    if arguments == ex.expected["arguments"]:
                        args_right += 1
                    for name, value in ex.expected["arguments"].items():
                        counts = fields.setdefault(name, [0, 0])
                        counts[0] += int(arguments.get(name) == value)
                        counts[1] += 1
        else:
            none_total += 1
            content = (parsed.content or "").replace("<|im_end|>", "").strip()
            none_right += int(not parsed.tool_calls and bool(content))
            if ex.messages[-2]["role"] == "tool":
                final_total += 1
                final_right += int(not parsed.tool_calls and content == ex.messages[-1]["content"].strip())
    pct = lambda a, b: 100.0 * a / b if b else float("nan")
    return {"parseable call": pct(tool_parsed, tool_total), "right tool": pct(tool_right, tool_total),
            "exact arguments": pct(args_right, tool_total), "correct no-tool": pct(none_right, none_total),
            "answer after a tool": pct(final_right, final_total),
            "fields": {name: (pct(a, b), b) for name, (a, b) in sorted(fields.items())},
            "n_tool": tool_total, "n_none": none_total, "n_final": final_total}


def run_accuracy(model_dir: Path, prompts: list[str], max_tokens: int) -> list[str]:
    llm = LLM(model_dir, dtype="bfloat16", max_num_seqs=32)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
    outs = llm.generate(prompts, params)
    return [o.outputs[0].text for o in outs]


def decode_pass(engine, prompts: list[str], params: SamplingParams) -> tuple[float, float]:
    """(decode tok/s, mean time to first token in seconds). Decode speed as serving benchmarks define it
    (time per output token): the tokens after the first, over the time from the step that returned the
    first token to the step that returned the last. The first step (prefill, and with MTP the drafter's pass
    over the prompt) is time to first token, not decode."""
    decode_time, tokens, to_first = 0.0, 0, 0.0
    for i, p in enumerate(prompts):
        arrival = time.perf_counter()
        engine.add_request(f"speed-{i}", p, params)
        first = last = None
        while engine.has_unfinished_requests():
            out = engine.step()
            now = time.perf_counter()
            if out and out[0].outputs[0].token_ids:
                first = first if first is not None else (now, len(out[0].outputs[0].token_ids))
                last = (now, len(out[0].outputs[0].token_ids))
        decode_time += last[0] - first[0]
        tokens += last[1] - first[1]
        to_first += first[0] - arrival
    return tokens / decode_time, to_first / len(prompts)


def run_speed(model_dir: Path, prompts: list[str], ks: list[int], max_tokens: int, dtypes: list[str],
              repeats: int = 5) -> dict[tuple[str, int], dict[str, float]]:
    """Every (dtype, k) engine is built first and the passes alternate between them, so that a slow spell
    of this shared machine falls on all of them alike. Each reports its median pass; its speed-up over any
    other is the median over passes of the ratio of the two speeds in the same pass (the machine's speed
    drifts by a third within a run, so passes far apart in time do not compare)."""
    llms = {(dtype, k): LLM(model_dir, dtype=dtype, max_num_seqs=1,
                            speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
            for dtype in dtypes for k in ks}
    # replies end at their own eos (as served), so acceptance is measured on real replies, not on the
    # text a model rambles on with after it would have stopped
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for llm in llms.values():
        llm.generate(prompts[:1], params)                    # warm-up, excluded
    speeds: dict[tuple[str, int], list[float]] = {key: [] for key in llms}
    ttfts: dict[tuple[str, int], list[float]] = {key: [] for key in llms}
    for _ in range(repeats):
        for key, llm in llms.items():
            stats = llm.engine.spec_stats
            stats.num_drafted = stats.num_accepted = stats.num_verifications = 0
            speed, to_first = decode_pass(llm.engine, prompts, params)
            speeds[key].append(speed)
            ttfts[key].append(to_first)
    return {key: {"tok/s": statistics.median(speeds[key]), "ttft": statistics.median(ttfts[key]),
                  "passes": speeds[key], "acceptance": llms[key].engine.spec_stats.acceptance_rate,
                  "tokens/step": llms[key].engine.spec_stats.mean_accepted_length} for key in llms}


def speed_up(a: list[float], b: list[float]) -> float:
    """The median over passes of a's speed over b's in the same pass."""
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_DIR)
    ap.add_argument("--n", type=int, default=200, help="held-out examples for the accuracy table")
    ap.add_argument("--speed-n", type=int, default=12, help="prompts for the MTP speed table")
    ap.add_argument("--speed-repeats", type=int, default=5, help="passes over those prompts (medians are shown)")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--formats", default="bf16,fp8,nvfp4", help="columns of table 1; empty: only the MTP table")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed-dtypes", default="bfloat16,float32",
                    help="compute dtypes of the MTP speed table (the first: the checkpoint's, as `nemoh serve` runs "
                         "the demo)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    examples = generate("heldout", args.n, seed=args.seed)
    prompts = prompts_for(examples, args.model)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text("\n".join(render(ex).replace("\n", " ") for ex in generate("train", 16, seed=99)))
        for fmt in formats:
            path = args.model
            if fmt != "bf16":
                path = Path(tmp) / fmt
                quantize_checkpoint(args.model, path, fmt=fmt, calib_file=calib if fmt == "fp8" else None,
                                    progress=False)
            start = time.perf_counter()
            results[fmt] = score(examples, run_accuracy(path, prompts, args.max_tokens))
            results[fmt]["seconds"] = time.perf_counter() - start
    if formats:
        first = results[formats[0]]
        print(f"\nHeld-out tickets: {first['n_tool']} needing a tool, {first['n_none']} needing none "
              f"(greedy, max_tokens={args.max_tokens})")
        print(f"{'metric':18}" + "".join(f"{f.upper():>10}" for f in formats))
        for metric in ("parseable call", "right tool", "exact arguments", "correct no-tool"):
            print(f"{metric:18}" + "".join(f"{results[f][metric]:9.1f}%" for f in formats))
        print(f"\nWhere the arguments and answers go wrong: each argument's value exactly right, over the calls that "
              f"name the right tool (n), and the {first['n_final']} answers after a tool result equal to the "
              f"reference answer (which restates the result)")
        print(f"{'argument':18}{'n':>5}" + "".join(f"{f.upper():>10}" for f in formats))
        for name, (_, n) in first["fields"].items():
            print(f"{name:18}{n:>5}" + "".join(f"{results[f]['fields'].get(name, (float('nan'),))[0]:9.1f}%"
                                              for f in formats))
        print(f"{'answer after tool':18}{first['n_final']:>5}"
              + "".join(f"{results[f]['answer after a tool']:9.1f}%" for f in formats))

    speed_prompts = prompts_for(generate("heldout", args.speed_n, seed=args.seed + 1), args.model)
    dtypes = [d.strip() for d in args.speed_dtypes.split(",") if d.strip()]
    ks = [0, 1, 2, 3]
    speeds = run_speed(args.model, speed_prompts, ks, args.max_tokens, dtypes, args.speed_repeats)
    for dtype in dtypes:
        base = speeds[(dtype, 0)]["passes"]
        print(f"\nMTP speculative decoding, single stream, BF16 weights computed in {dtype}, greedy, "
              f"{args.speed_n} held-out prompts, medians of {args.speed_repeats} interleaved passes, "
              f"whole replies (up to {args.max_tokens} tokens)")
        print(f"{'k':>3} {'acceptance':>11} {'tokens/step':>12} {'decode tok/s':>13} {'speed-up':>9} {'TTFT ms':>8}")
        for k in ks:
            r = speeds[(dtype, k)]
            acc = f"{r['acceptance']:.3f}" if k else "-"
            steps = f"{r['tokens/step']:.2f}" if k else "1.00"
            print(f"{k:>3} {acc:>11} {steps:>12} {r['tok/s']:13.1f} {speed_up(r['passes'], base):8.2f}x "
                  f"{r['ttft'] * 1e3:8.1f}")
    if len(dtypes) > 1:
        print("\nAcross dtypes (median per-pass ratio): " + ", ".join(
            f"{a} k={k} over {b} k=0 {speed_up(speeds[(a, k)]['passes'], speeds[(b, 0)]['passes']):.2f}x"
            for a in dtypes for b in dtypes if a != b for k in (0, ks[-1])))


if __name__ == "__main__":
    main()
