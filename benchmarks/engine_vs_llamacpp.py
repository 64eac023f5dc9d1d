"""nemoh against llama.cpp on the same weights, on this CPU, in one run.

    python benchmarks/engine_vs_llamacpp.py --llama-cpp PATH [--models demo hybrid47] [--formats f32 bf16]
        [--rounds 5] [--streams 1 8 32] [--mtp] [--threads 2] [--dir WORKDIR]

PATH (or $LLAMA_CPP_DIR) is a llama.cpp source tree built with `cmake -B build -DGGML_NATIVE=ON
-DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-bench llama-batched-bench llama-quantize`
(../shared/tools/llamacpp/README.md says where the source comes from); the script says so when it is missing.

Models: `demo` (the shipped demo model, its own weights), `hybrid47` (47M parameters, random: hidden 512,
`MEMEM*EMEMEM`, 8 heads / 2 KV heads, Mamba 16x64 state 64, 16 experts top-4 of width 512, latent 256, vocab 8192)
and `hybrid499` (499M, random, weights beyond any cache: hidden 1024, 24 layers, 32 experts top-4 of width 1024,
latent 512). Formats: f32, bf16, nvfp4 and fp8 (nemoh: `nemoh quantize`; llama.cpp: its converter reads the
same ModelOpt NVFP4 checkpoint; for FP8 it is compared with llama.cpp's Q8_0 of the same weights, as llama.cpp
has no FP8 type; nemoh runs the quantized checkpoints with bfloat16 activations, as a bfloat16 model would).
llama.cpp converts each checkpoint with its own convert_hf_to_gguf.py; the demo tokenizer's
pre-tokenizer is unknown to it, so the converter runs with `get_vocab_base_pre` patched to "default" (token
ids are all that is measured; text never goes through llama.cpp's tokenizer).

What is measured, each in a fresh process, the two engines alternating for `--rounds` rounds (medians):
- 1 stream: decode of 128 tokens after a 512-token prompt (llama-bench `tg128 @ d512`), tokens/s;
- N streams: N sequences of 128-token prompts decoding 128 tokens together (llama-batched-bench S_TG),
  decode tokens/s over all sequences;
- prefill: one 512-token prompt (llama-bench `pp512`), tokens/s;
- with --mtp, nemoh's single stream with MTP speculative decoding (k = 3) on the demo model, against llama.cpp's
  single stream (llama.cpp has no MTP for this model), on a prompt from the demo's own held-out tickets.
nemoh decodes greedily with ignore_eos (llama.cpp's benchmarks generate a fixed count as well). The physical
floor printed next to single-stream decode is the bytes of weights a token reads divided by the bandwidth of
a float32 sum over 256 MiB measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nemoh" / "demo" / "model"
HYBRID47 = dict(
    vocab_size=8192, hidden_size=512, hybrid_override_pattern="MEMEM*EMEMEM", num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=64,
    ssm_state_size=64, n_groups=2, conv_kernel=4, chunk_size=128, n_routed_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=512, moe_shared_expert_intermediate_size=1024, moe_latent_size=256, n_group=1,
    topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, eos_token_id=[2, 11], bos_token_id=1,
    pad_token_id=3, max_position_embeddings=8192)
HYBRID499 = dict(HYBRID47, hidden_size=1024, hybrid_override_pattern="MEMEM*EMEMEM" * 2, num_attention_heads=16,
                 mamba_num_heads=32, ssm_state_size=128, n_routed_experts=32, moe_intermediate_size=1024,
                 moe_shared_expert_intermediate_size=2048, moe_latent_size=512, intermediate_size=2048)
RANDOM_MODELS = {"hybrid47": HYBRID47, "hybrid499": HYBRID499}
LLAMA_TYPES = {"f32": "f32", "bf16": "bf16", "nvfp4": "NVFP4", "fp8": "Q8_0"}


# ---------------------------------------------------------------------------------------------- checkpoints
def build_random(path: Path, config: dict) -> None:
    """A random NemotronH in the HF layout with the demo tokenizer (its vocabulary padded to the config's)."""
    if (path / "config.json").is_file():
        return
    import shutil

    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():          # trained-like scales: no overflow in bfloat16
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(DEMO / f, path / f)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", file=sys.stderr)


def nemoh_checkpoint(work: Path, model: str, fmt: str) -> Path:
    """The checkpoint nemoh loads for (model, format); quantized copies made by `nemoh quantize`."""
    base = DEMO if model == "demo" else work / model
    if model != "demo":
        build_random(base, RANDOM_MODELS[model])
    if fmt in ("f32", "bf16"):
        return base
    out = work / f"{model}-{fmt}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "nemoh", "quantize", str(base), str(out), "--format", fmt]
        if fmt == "fp8":
            calib = work / "calib.txt"
            calib.write_text("\n".join(f"ticket {i}: my laptop does not connect to the VPN, error {i}"
                                       for i in range(16)))
            cmd += ["--calib", str(calib)]
        subprocess.run(cmd, check=True)
    return out


def gguf(work: Path, llama: Path, model: str, fmt: str) -> Path:
    """llama.cpp's own conversion of the same weights (its converter; llama-quantize for Q8_0)."""
    out = work / f"{model}-{fmt}.gguf"
    if out.is_file():
        return out
    if fmt == "fp8":
        src = gguf(work, llama, model, "f32")
        subprocess.run([str(llama / "build" / "bin" / "llama-quantize"), str(src), str(out), "Q8_0"], check=True,
                       capture_output=True)
        return out
    ckpt = nemoh_checkpoint(work, model, "nvfp4" if fmt == "nvfp4" else "f32")
    patch = ("import runpy, sys\nsys.path.insert(0, sys.argv[1])\nimport conversion.base as b\n"
             "for n in dir(b):\n    c = getattr(b, n)\n"
             "    if isinstance(c, type) and 'get_vocab_base_pre' in vars(c):\n"
             "        def p(self, t, _o=c.get_vocab_base_pre):\n"
             "            try:\n                return _o(self, t)\n"
             "            except NotImplementedError:\n                return 'default'\n"
             "        c.get_vocab_base_pre = p\n"
             "sys.argv = sys.argv[1:]\nsys.argv[0] += '/convert_hf_to_gguf.py'\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-c", patch, str(llama), str(ckpt), "--outfile", str(out)]
    if fmt != "nvfp4":
        cmd += ["--outtype", fmt]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


# ---------------------------------------------------------------------------------------------- nemoh side
def nemoh_child(args: argparse.Namespace) -> None:
    """Runs in its own process: one nemoh measurement, printed as JSON."""
    import torch

    from nemoh import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    spec = {"method": "mtp", "num_speculative_tokens": 3} if args.mtp else None
    dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    llm = LLM(args.path, dtype=dtype, max_num_seqs=max(args.streams, 1), max_num_batched_tokens=2048,
              cache_memory_gb=2.0, speculative_config=spec)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if args.held_out:
        print(json.dumps({"tok_s": held_out_decode(engine)}))
        return
    prompt = torch.randint(20, min(vocab, 4000), (args.prompt,), generator=gen).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    llm.generate([prompt[:64]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))     # warm-up
    result = {}
    if args.what == "prefill":
        engine.add_request("p", prompt_token_ids=prompt, params=SamplingParams(max_tokens=1))
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        result["tok_s"] = len(prompt) / (time.perf_counter() - t)
    else:
        prompts = [prompt] if args.streams == 1 else [
            torch.randint(20, min(vocab, 4000), (args.prompt,), generator=gen).tolist() for _ in range(args.streams)]
        for i, p in enumerate(prompts):
            engine.add_request(str(i), prompt_token_ids=p, params=greedy)
        while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()                    # prefill every prompt; its first token is not timed
        n0, t = engine.counters.num_generation_tokens, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        result["tok_s"] = (engine.counters.num_generation_tokens - n0) / (time.perf_counter() - t)
    print(json.dumps(result))


def held_out_decode(engine, n: int = 12) -> float:
    """Single-stream decode tok/s over the demo's held-out helpdesk tickets, each reply generated whole
    (greedy, until the model stops), as benchmarks/demo_eval.py measures MTP: the tokens after the first over
    the time from the step that returned the first to the step that returned the last."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from demo_eval import decode_pass, prompts_for

    from nemoh import SamplingParams
    from nemoh.demo.corpus import generate

    prompts = prompts_for(generate("heldout", n, seed=1), DEMO)
    params = SamplingParams(temperature=0.0, max_tokens=256)
    decode_pass(engine, prompts[:2], params)                   # warm-up
    speed, _ = decode_pass(engine, prompts, params)
    return speed


def run_nemoh(path: Path, fmt: str, what: str, streams: int, threads: int, mtp: bool = False,
              held_out: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", str(path), "--dtype", "f32" if fmt == "f32" else "bf16",
           "--what", what, "--streams", str(streams), "--threads", str(threads)]
    if mtp:
        cmd.append("--mtp")
    if held_out:
        cmd.append("--held-out")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- llama.cpp side
def run_llama(llama: Path, model: Path, what: str, streams: int, threads: int) -> dict:
    bins = llama / "build" / "bin"
    if what == "prefill" or streams == 1:
        args = ["-p", "512", "-n", "0"] if what == "prefill" else ["-p", "0", "-n", "128", "-d", "512"]
        out = subprocess.run([str(bins / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json",
                              *args], check=True, capture_output=True, text=True)
        return {"tok_s": json.loads(out.stdout)[0]["avg_ts"]}
    out = subprocess.run([str(bins / "llama-batched-bench"), "-m", str(model), "-c", "16384", "-b", "2048",
                          "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", str(streams), "-t", str(threads)],
                         check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2] == str(streams):
            return {"tok_s": float(cells[7])}
    raise RuntimeError(f"no S_TG row for {streams} streams in llama-batched-bench's output:\n{out.stdout}")


def llama_build_info(llama: Path) -> str:
    commit = subprocess.run(["git", "-C", str(llama), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    flags = []
    cache = llama / "build" / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if re.match(r"(CMAKE_BUILD_TYPE|GGML_NATIVE|GGML_AVX\w*|GGML_FMA|GGML_F16C|CMAKE_C_COMPILER):", line):
                flags.append(line.split(":", 1)[0] + "=" + line.split("=", 1)[1])
    return f"llama.cpp {commit} ({', '.join(flags)})"


# ---------------------------------------------------------------------------------------------- the run
def read_bandwidth() -> float:
    import torch

    big = torch.randn(64 * 1024 * 1024)
    big.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t)
    return big.numel() * 4 / min(times)


def weight_bytes_per_token(path: Path, fmt: str) -> int:
    """Bytes of weights a decode token reads as nemoh holds them for `fmt` (float weights in the compute
    dtype, the router in float32, quantized ones packed): every tensor but the embedding table (one row is
    read) and the routed experts, of which top-k / n are read; MTP excluded."""
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    share = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    float_bytes = 2 if fmt == "bf16" else 4
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name.startswith("mtp.") or "embeddings" in name:
                    continue
                t = f.get_slice(name)
                size = 1
                for d in t.get_shape():
                    size *= d
                if t.get_dtype() in ("U8", "F8_E4M3"):
                    elem = 1
                elif name.endswith("gate.weight") or name.endswith("_bias"):
                    elem = 4
                else:
                    elem = float_bytes
                total += size * elem * (share if ".experts." in name else 1.0)
    return int(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp tree with build/bin")
    ap.add_argument("--models", nargs="+", default=["demo", "hybrid47"])
    ap.add_argument("--formats", nargs="+", default=["f32", "bf16"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mtp", action="store_true", help="also nemoh's MTP (k=3) single stream on the demo model")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nemoh-vs-llamacpp"))
    # child-process mode (one nemoh measurement)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--what", default="decode", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--gen", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--held-out", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.streams = args.streams[0]
        if args.what != "prefill" and args.streams > 1:
            args.prompt = 128
        nemoh_child(args)
        return
    if not args.llama_cpp or not (Path(args.llama_cpp) / "build" / "bin" / "llama-bench").is_file():
        sys.exit("llama.cpp not found: pass --llama-cpp PATH (or set LLAMA_CPP_DIR) to a llama.cpp source tree "
                 "built with\n  cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j2 "
                 "--target llama-bench llama-batched-bench llama-quantize\n(see ../shared/tools/llamacpp/README.md "
                 "for the source: the llama-cpp-python sdist vendors it)")
    llama = Path(args.llama_cpp)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    print(llama_build_info(llama))
    bandwidth = read_bandwidth()
    print(f"memory bandwidth (float32 sum of 256 MiB, best of 5): {bandwidth / 1e9:.1f} GB/s; threads {args.threads}")
    rows = []
    for model in args.models:
        for fmt in args.formats:
            path = nemoh_checkpoint(work, model, fmt)
            model_gguf = gguf(work, llama, model, fmt)
            floor = weight_bytes_per_token(path, fmt) / bandwidth
            tests = [("decode", s) for s in args.streams] + ([] if args.no_prefill else [("prefill", 1)])
            for what, streams in tests:
                ours, theirs = [], []
                for r in range(args.rounds):
                    sides = [("nemoh", ours), ("llama", theirs)]
                    for side, acc in (sides if r % 2 == 0 else sides[::-1]):
                        if side == "nemoh":
                            acc.append(run_nemoh(path, fmt, what, streams, args.threads)["tok_s"])
                        else:
                            acc.append(run_llama(llama, model_gguf, what, streams, args.threads)["tok_s"])
                a, b = statistics.median(ours), statistics.median(theirs)
                label = "prefill 512" if what == "prefill" else f"{streams} stream{'s' * (streams > 1)}"
                extra = f" (floor {1 / floor:,.0f} tok/s)" if what == "decode" and streams == 1 else ""
                rows.append((model, fmt, label, a, b))
                print(f"{model:9s} {fmt:5s} {label:12s} nemoh {a:9,.0f}  llama.cpp {LLAMA_TYPES[fmt]:5s} {b:9,.0f}  "
                      f"ratio {a / b:5.2f}{extra}   rounds nemoh {[round(x) for x in ours]} "
                      f"llama {[round(x) for x in theirs]}", flush=True)
    if args.mtp:
        # held-out helpdesk tickets (what the MTP head predicts well), whole replies; llama.cpp's single stream
        # (tg128 after 512 tokens; it has no MTP for this model) as the baseline
        path = nemoh_checkpoint(work, "demo", "bf16")
        model_gguf = gguf(work, llama, "demo", "bf16")
        with_mtp, without, theirs = [], [], []
        for r in range(args.rounds):
            with_mtp.append(run_nemoh(path, "bf16", "decode", 1, args.threads, mtp=True, held_out=True)["tok_s"])
            without.append(run_nemoh(path, "bf16", "decode", 1, args.threads, held_out=True)["tok_s"])
            theirs.append(run_llama(llama, model_gguf, "decode", 1, args.threads)["tok_s"])
        a, a0, b = statistics.median(with_mtp), statistics.median(without), statistics.median(theirs)
        rows.append(("demo", "bf16", "1 stream, MTP k=3", a, b))
        print(f"demo      bf16  MTP k=3      nemoh {a:9,.0f} (without MTP {a0:,.0f} on the same tickets)  "
              f"llama.cpp bf16 {b:9,.0f}  ratio {a / b:5.2f}   rounds {[round(x) for x in with_mtp]}")
    print("\n| model | weights | test | nemoh tok/s | llama.cpp tok/s | ratio |\n|---|---|---|--:|--:|--:|")
    for model, fmt, label, a, b in rows:
        print(f"| {model} | {fmt} (llama.cpp {LLAMA_TYPES[fmt]}) | {label} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
