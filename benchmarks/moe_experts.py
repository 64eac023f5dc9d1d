"""How LatentMoE runs its plain experts, timed side by side. For one token (a decode step): its experts one
after another against the general way (sort the pairs by expert, grouped product, scatter back). For more: one
grouped product per projection
(`F.grouped_mm`, each expert's rows padded to a multiple of GROUP_ROWS from GROUP_PAD_MIN_PAIRS pairs), the
same without that padding, and one batched product over experts padded to the busiest one (`torch.bmm`).

    python benchmarks/moe_experts.py [--experts 16 --latent 256 --inter 512 --top-k 4 --layers 8]

Every timed call gets a routing it has not seen (as serving and training do: expert counts change from batch
to batch, and oneDNN builds a kernel for every new row count), warm-up excluded, per (dtype, tokens), and
the next of `--layers` MoE layers (8 by default: 128 MiB of float32 experts at the default sizes, four times
this machine's cache), so that the weights come from memory as in a model's step, not from cache (with one
layer timed over and over, float32's batched product looked no faster than the grouped one).
LatentMoE takes the batched product for the token counts in PADDED_TOKENS (PADDED_TOKENS_FLOAT32 in float32)
in inference, the grouped one otherwise; this prints what those choices rest on, and checks the ways agree.
The last table is the trainer's case: forward + backward under bfloat16 autocast.
"""
from __future__ import annotations

import argparse
import time

import torch

import nemoh.models.moe as moe_module
from nemoh.config import NemotronHConfig
from nemoh.models.moe import LatentMoE


def routings(n_tokens: int, experts: int, top_k: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random routings as (expert-sorted expert id of each pair, per-expert counts). A skewed
    expert popularity, as trained routers have, so that counts differ between experts and between calls."""
    out = []
    for _ in range(count):
        popularity = torch.distributions.Dirichlet(torch.full((experts,), 2.0)).sample()
        ids = torch.stack([torch.multinomial(popularity, top_k) for _ in range(n_tokens)]).reshape(-1)
        out.append((ids.sort().values, torch.bincount(ids, minlength=experts)))
    return out


def timed(fn, warm: list, timed_cases: list) -> float:
    for case in warm:
        fn(*case)
    start = time.perf_counter()
    for case in timed_cases:
        fn(*case)
    return (time.perf_counter() - start) / len(timed_cases)


def unpadded(fn):
    """fn with the grouped product's row padding switched off."""
    def run(*args):
        saved, moe_module.GROUP_PAD_MIN_PAIRS = moe_module.GROUP_PAD_MIN_PAIRS, float("inf")
        try:
            return fn(*args)
        finally:
            moe_module.GROUP_PAD_MIN_PAIRS = saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--latent", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", default="1,4,32,128,512,2048")
    ap.add_argument("--train-tokens", default="2048,8192")
    ap.add_argument("--layers", type=int, default=8, help="MoE layers the timed calls cycle through")
    args = ap.parse_args()
    config = NemotronHConfig.from_dict(dict(
        model_type="nemotron_h", hidden_size=args.latent * 2, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.inter, moe_latent_size=args.latent, moe_shared_expert_intermediate_size=64,
        n_group=1, topk_group=1, hybrid_override_pattern="E", num_hidden_layers=1, vocab_size=16))
    torch.manual_seed(0)
    print(f"{args.experts} experts of {args.latent} -> {args.inter} -> {args.latent}, top-{args.top_k}, "
          f"{torch.get_num_threads()} threads, rows padded to {moe_module.GROUP_ROWS} from "
          f"{moe_module.GROUP_PAD_MIN_PAIRS} pairs; a new routing for every call")
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = [LatentMoE(config, 0).to(dtype) for _ in range(args.layers)]
        for moe in models[dtype]:
            for p in moe.parameters():
                torch.nn.init.normal_(p, std=0.05)

    print("\none token, the whole expert step (routing weights applied, summed into the token's row)")
    print(f"{'dtype':>9} {'one-token ms':>12} {'sorted ms':>10} {'speed-up':>9} {'max diff':>9}")
    for dtype, layers in models.items():
        cases = []
        for i, (ids, _) in enumerate(routings(1, args.experts, args.top_k, 403)):
            weights = torch.rand(1, args.top_k)
            cases.append((layers[i % len(layers)], torch.randn(1, args.latent, dtype=dtype), weights,
                          ids[torch.randperm(args.top_k)][None]))
        one_token = lambda moe, *c: moe._one_token_experts(*c)
        sorted_way = lambda moe, *c: moe._sorted_experts(*c)
        with torch.inference_mode():
            diff = max((one_token(*c).float() - sorted_way(*c).float()).abs().max().item() for c in cases[:3])
            t1, ts = (timed(fn, cases[:3], cases[3:]) for fn in (one_token, sorted_way))
        print(f"{str(dtype).split('.')[-1]:>9} {t1 * 1e3:>12.3f} {ts * 1e3:>10.3f} {ts / t1:>8.2f}x {diff:>9.1e}")

    print(f"\n{'dtype':>9} {'tokens':>6} {'grouped ms':>10} {'unpadded ms':>11} {'bmm ms':>8} {'max diff':>9}")
    for dtype, layers in models.items():
        for n in map(int, args.tokens.split(",")):
            reps = max(2 * len(layers), min(200, 4000 // n))
            cases = [(layers[i % len(layers)], torch.randn(n * args.top_k, args.latent, dtype=dtype), counts, ids)
                     for i, (ids, counts) in enumerate(routings(n, args.experts, args.top_k, reps + 3))]
            grouped = lambda moe, x, counts, ids: moe._grouped_experts(x, counts)
            batched = lambda moe, x, counts, ids: moe._padded_experts(x, counts, ids)
            with torch.inference_mode():
                diff = max((grouped(*c).float() - batched(*c).float()).abs().max().item() for c in cases[:2])
                diff = max(diff, (grouped(*cases[0]).float() - unpadded(grouped)(*cases[0]).float()).abs().max().item())
                tg, tu, tp = (timed(fn, cases[:3], cases[3:]) for fn in (grouped, unpadded(grouped), batched))
            print(f"{str(dtype).split('.')[-1]:>9} {n:>6} {tg * 1e3:>10.3f} {tu * 1e3:>11.3f} {tp * 1e3:>8.3f} "
                  f"{diff:>9.1e}")

    print("\ntraining step of the experts (forward + backward, bfloat16 autocast, float32 weights)")
    print(f"{'tokens':>6} {'grouped ms':>10} {'unpadded ms':>11} {'speed-up':>9}")
    moe = LatentMoE(config, 0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)

    def train_step(x, counts, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            moe._grouped_experts(x, counts).float().sum().backward()

    for n in map(int, args.train_tokens.split(",")):
        cases = [(torch.randn(n * args.top_k, args.latent, dtype=torch.bfloat16, requires_grad=True), counts, ids)
                 for ids, counts in routings(n, args.experts, args.top_k, 8)]
        tg, tu = timed(train_step, cases[:3], cases[3:]), timed(unpadded(train_step), cases[:3], cases[3:])
        print(f"{n:>6} {tg * 1e3:>10.1f} {tu * 1e3:>11.1f} {tu / tg:>8.2f}x")


if __name__ == "__main__":
    main()
