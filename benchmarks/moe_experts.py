"""The two ways LatentMoE runs its plain experts, timed side by side: one grouped product per projection
(`F.grouped_mm`) against one batched product over experts padded to the busiest one (`torch.bmm`).

    python benchmarks/moe_experts.py [--experts 16 --latent 256 --inter 512 --top-k 4]

Random routing, warm-up excluded, per (dtype, tokens). LatentMoE takes the padded product for 2 to
PADDED_MAX_TOKENS tokens in bfloat16 / float16 inference, the grouped one otherwise; this prints what that
choice rests on, and checks the two agree.
"""
from __future__ import annotations

import argparse
import time

import torch

from nemoh.config import NemotronHConfig
from nemoh.models.moe import LatentMoE


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--latent", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", default="1,4,32,128,512,2048")
    args = ap.parse_args()
    config = NemotronHConfig.from_dict(dict(
        model_type="nemotron_h", hidden_size=args.latent * 2, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.inter, moe_latent_size=args.latent, moe_shared_expert_intermediate_size=64,
        n_group=1, topk_group=1, hybrid_override_pattern="E", num_hidden_layers=1, vocab_size=16))
    torch.manual_seed(0)
    print(f"{args.experts} experts of {args.latent} -> {args.inter} -> {args.latent}, top-{args.top_k}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'dtype':>9} {'tokens':>6} {'grouped ms':>10} {'padded ms':>10} {'padded/grouped':>14} {'max diff':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        moe = LatentMoE(config, 0).to(dtype)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.05)
        for n in map(int, args.tokens.split(",")):
            ids = torch.stack([torch.randperm(args.experts)[:args.top_k] for _ in range(n)]).reshape(-1)
            order = torch.argsort(ids, stable=True)
            counts = torch.bincount(ids, minlength=args.experts)
            inputs = torch.randn(len(ids), args.latent, dtype=dtype)
            with torch.inference_mode():
                grouped = lambda: moe._grouped_experts(inputs, counts)
                padded = lambda: moe._padded_experts(inputs, counts, ids[order])
                diff = (grouped().float() - padded().float()).abs().max().item()
                reps = max(5, 2000 // n)
                tg, tp = timed(grouped, reps), timed(padded, reps)
            print(f"{str(dtype).split('.')[-1]:>9} {n:>6} {tg * 1e3:>10.3f} {tp * 1e3:>10.3f} {tp / tg:>13.2f}x "
                  f"{diff:>9.1e}")


if __name__ == "__main__":
    main()
