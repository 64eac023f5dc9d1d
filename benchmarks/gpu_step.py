"""GPU: the decode-step time of a Super-width slice, eager against captured (CUDA graphs), at batch 1 / 8 / 32.

The slice is Nemotron 3 Super at its real widths (REFERENCE.md §2: hidden 4096, vocab 131072) with one layer of
each kind — pattern `M*E`: one Mamba-2 mixer (128 heads x 64, state 128, 8 groups), one attention layer (32 heads,
2 KV heads, head_dim 128), one LatentMoE (512 experts top-22, expert width 2688, latent 1024, shared expert 5376) —
random weights of trained-like scale, built straight on the device (no checkpoint, nothing downloaded). Each
batch size runs the real engine (`LLMEngine`: scheduler, caches, the captured step or the eager forward, the
batched sampler): B sequences of 64-token prompts are prefilled, then `--steps` decode steps are timed
(median step, `torch.cuda.synchronize` inside the engine's own token read-back). Printed per batch size:
eager ms/step, captured ms/step, their ratio, and the kernels launched by one eager decode step (counted with
torch.profiler) — the per-operator overhead the captured step removes.

    python benchmarks/gpu_step.py [--batch 1 8 32] [--steps 20] [--dtype bfloat16] [--budget-s 420]
    python benchmarks/gpu_step.py --device cpu --scale 16 --steps 3      # a smoke run of the script on a CPU

On a CPU (`--device cpu`) the "captured" side is the graph-safe step run eagerly (`captured_step="graph_eager"`):
it checks the script, not a speed. `--scale N` divides every width by N (for such smoke runs). `--budget-s`
stops starting new batch sizes once that much time has passed (the issue asks for < 8 minutes on one
H100 / H200).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

SUPER_SLICE = dict(
    vocab_size=131072, hidden_size=4096, hybrid_override_pattern="M*E", num_attention_heads=32,
    num_key_value_heads=2, head_dim=128, intermediate_size=5376, mamba_num_heads=128, mamba_head_dim=64,
    ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128, n_routed_experts=512, num_experts_per_tok=22,
    moe_intermediate_size=2688, moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, n_group=1,
    topk_group=1, routed_scaling_factor=5.0, norm_topk_prob=True, eos_token_id=[2, 11], bos_token_id=1,
    pad_token_id=0, max_position_embeddings=4096, model_type="nemotron_h")
WIDTHS = ("hidden_size", "intermediate_size", "mamba_num_heads", "moe_intermediate_size",
          "moe_shared_expert_intermediate_size", "moe_latent_size", "n_routed_experts", "vocab_size")


def slice_config(scale: int) -> dict:
    cfg = dict(SUPER_SLICE)
    if scale > 1:
        for key in WIDTHS:
            cfg[key] = max(cfg[key] // scale, 8)
        cfg["num_experts_per_tok"] = max(cfg["num_experts_per_tok"] // scale, 2)
        cfg["head_dim"] = max(cfg["head_dim"] // scale, 16)
    return cfg


def random_model(cfg: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A NemotronH with random weights of trained-like scale, allocated on `device` directly."""
    from nemoh.config import NemotronHConfig
    from nemoh.models.nemotron_h import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(NemotronHConfig.from_dict(cfg))
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.fill_(1.0)
            elif leaf == "A_log":
                p.copy_(torch.log(torch.linspace(1, 16, p.numel(), device=device)).view_as(p))
            elif leaf == "dt_bias":
                p.fill_(math.log(math.expm1(0.01)))
            elif leaf == "D":
                p.fill_(1.0)
            elif leaf in ("bias", "e_score_correction_bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02, generator=gen)
    keep = {n for n, m in model.named_modules() if getattr(m, "keep_fp32", False)}
    for n, m in model.named_modules():
        if n not in keep and not any(n.startswith(k + ".") for k in keep):
            for registry in (m._parameters, m._buffers):
                for key, t in registry.items():
                    if t is not None and t.is_floating_point() and t.dtype != dtype:
                        registry[key] = type(t)(t.to(dtype), requires_grad=False) \
                            if isinstance(t, torch.nn.Parameter) else t.to(dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def engine_for(model, batch: int, eager: bool, device: str, dtype: str):
    from nemoh.engine.config import EngineArgs
    from nemoh.engine.llm_engine import LLMEngine

    mode = "auto" if device == "cuda" else "graph_eager"
    args = EngineArgs(dtype=dtype, device=device, max_num_seqs=batch, max_model_len=512, num_kv_blocks=batch * 10,
                      num_state_slots=batch, enforce_eager=eager, captured_step=mode)
    return LLMEngine(model, None, args)


def decode_steps(engine, batch: int, steps: int) -> list[float]:
    """Seconds per decode step of `batch` sequences (after their prefill), `steps` of them."""
    from nemoh.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", prompt_token_ids=torch.randint(3, vocab, (64,), generator=gen).tolist(),
                           params=SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    engine.step()                                    # the first decode step (and any lazy set-up) not timed
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def kernels_per_eager_step(engine, batch: int) -> int | None:
    """Device kernels launched by one eager decode step (None on a CPU)."""
    if engine.runner.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from nemoh.sampling_params import SamplingParams

    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", prompt_token_ids=list(range(3, 67)),
                           params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    count = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    while engine.has_unfinished_requests():
        engine.step()
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (smoke runs)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_step.py: no CUDA device here (torch.cuda.is_available() is False); "
                 "use --device cpu --scale 16 for a smoke run")
    start = time.perf_counter()
    dev = torch.device(args.device)
    cfg = slice_config(args.scale)
    model = random_model(cfg, getattr(torch, args.dtype), dev)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}; Super-width slice M*E "
          f"(hidden {cfg['hidden_size']}, {cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']}, "
          f"vocab {cfg['vocab_size']}): {params / 1e9:.2f}B parameters; {args.steps} timed decode steps, medians")
    print(f"{'batch':>5} {'eager ms':>9} {'captured ms':>12} {'speed-up':>9} {'kernels/eager step':>19}")
    for batch in args.batch:
        if time.perf_counter() - start > args.budget_s:
            print(f"# budget of {args.budget_s:.0f} s spent: batch {batch} and later not run")
            break
        eager = engine_for(model, batch, True, args.device, args.dtype)
        t_eager = statistics.median(decode_steps(eager, batch, args.steps))
        launches = kernels_per_eager_step(eager, batch)
        del eager
        captured = engine_for(model, batch, False, args.device, args.dtype)
        t_cap = statistics.median(decode_steps(captured, batch, args.steps))
        del captured
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{batch:>5} {t_eager * 1e3:>9.2f} {t_cap * 1e3:>12.2f} {t_eager / t_cap:>8.1f}x "
              f"{launches if launches is not None else '-':>19}", flush=True)
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
