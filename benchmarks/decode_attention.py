"""A decode batch's attention (one query per sequence, keys padded under a mask): CPU SDPA against the
engine's alternative, side by side, with the largest difference between them. For a batch the alternative is
the two batched products of `Attention._one_query_attention`; for one sequence, `_lone_query_attention`
(SDPA on the query row twice, keys cut to the sequence's length). The engine takes the alternatives in
bfloat16 / float16, SDPA in float32, from this table.

    python benchmarks/decode_attention.py [--threads 2]

Shapes: the demo model's heads (4 query, 2 KV, head dim 64) and engine_vs_hf.py's (8 query, 2 KV, 64), for
one sequence and for 32, each with a random number of valid keys up to the padded width (as a decode
batch's block tables give). Random inputs, warm-up excluded, the median of 5 timings of a fixed number of
calls.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nemoh.models.attention import Attention

SHAPES = [("demo", 4, 2, 1, 600), ("demo", 4, 2, 1, 1200), ("demo", 4, 2, 32, 600), ("engine_vs_hf", 8, 2, 1, 256),
          ("engine_vs_hf", 8, 2, 32, 256)]


def timed(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print("| shape (q heads / kv heads, sequences x keys) | dtype | SDPA (us) | engine (us) | ratio | max diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, heads, kv_heads, b, kv_len in SHAPES:
        # only the attention's own keys
        config = SimpleNamespace(hidden_size=256, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                                 attention_bias=False)
        attn = Attention(config, 0)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, heads, 64, generator=g).to(dtype)
            keys = torch.randn(b, kv_len, kv_heads, 64, generator=g).to(dtype)
            values = torch.randn(b, kv_len, kv_heads, 64, generator=g).to(dtype)
            lens = torch.randint(kv_len // 2, kv_len + 1, (b,), generator=g)
            mask = (torch.arange(kv_len)[None, :] < lens[:, None])[:, None, None, :]
            sdpa = lambda: F.scaled_dot_product_attention(
                q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=attn.scale,
                enable_gqa=True)[:, :, 0]
            if b == 1:
                ours = lambda: attn._lone_query_attention(q, keys[0], values[0], int(lens[0]))
            else:
                ours = lambda: attn._one_query_attention(q, keys, values, mask)
            diff = (sdpa().float() - ours().float()).abs().max().item()
            calls = 20 if b > 1 else 200
            t_sdpa, t_ours = timed(sdpa, calls), timed(ours, calls)
            print(f"| {name} ({heads}/{kv_heads}, {b} x {kv_len}) | {str(dtype).split('.')[-1]} | {t_sdpa * 1e6:.1f} "
                  f"| {t_ours * 1e6:.1f} | {t_sdpa / t_ours:.2f}x | {diff:.2g} |")


if __name__ == "__main__":
    main()
