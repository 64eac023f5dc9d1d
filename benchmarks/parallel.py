"""Tensor / expert parallelism on this CPU: step time and communication time per decode step at TP1, TP2 and
TP2 + EP (gloo, ranks as processes on the same cores: not faster here, the point is what the communication
costs), and the bytes one token sends for Nemotron 3 Super's shapes, counted by the model's own collective
wrappers (nemoh.distributed.collectives.TPGroup) on a Super-shaped model.

    python benchmarks/parallel.py [--streams 4] [--tokens 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]    # this tree; tests/checkpoints.py (random checkpoints)


class CountingTP:
    """A TPGroup that communicates nothing and counts what the real one would send (one process)."""

    def __init__(self, world_size: int, vocab_size: int):
        from nemoh.distributed.collectives import CommStats

        self.rank, self.world_size, self.vocab_size = 0, world_size, vocab_size
        self.stats = CommStats()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.calls += 1
        self.stats.bytes += x.numel() * x.element_size()
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        self.stats.calls += 1
        self.stats.bytes += logits.numel() * logits.element_size()
        return torch.cat([logits] * self.world_size, dim=-1)[..., : self.vocab_size]


def super_bytes_per_token(world_size: int) -> dict:
    """Payload bytes per token of one decode step (main model + logits) and of one MTP draft step, Super's
    hidden size, layer pattern, vocabulary and bfloat16 activations; the widths that do not change what is sent
    (heads, experts, Mamba state) are shrunk so that the model fits here."""
    from nemoh.config import NemotronHConfig
    from nemoh.distributed.layout import ParallelLayout
    from nemoh.distributed.sharding import build_local_model
    from nemoh.models.forward_context import ForwardContext

    raw = json.loads((REPO / "benchmarks/configs/super-nvfp4/config.json").read_text())
    raw.update(mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=16, moe_latent_size=32, moe_shared_expert_intermediate_size=32,
               num_attention_heads=world_size * 2, num_key_value_heads=2, head_dim=8)
    config = NemotronHConfig.from_dict(raw)
    tp = CountingTP(world_size, config.vocab_size)
    model = build_local_model(config, ParallelLayout(world_size, 0), tp).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ids = torch.tensor([7])
    with torch.inference_mode():
        ctx = ForwardContext.for_full_forward(1, 1)
        hidden = model.forward_hidden(ids, ctx)
        model.compute_logits(hidden)
        main, calls = tp.stats.bytes, tp.stats.calls
        model.compute_logits(model.mtp_forward(ids, hidden, ForwardContext.for_full_forward(1, 1)))
    return {"main": main, "main_calls": calls, "mtp": tp.stats.bytes - main, "mtp_calls": tp.stats.calls - calls}


def measure(path: str, tp: int, ep: bool, streams: int, tokens: int) -> dict:
    from nemoh import LLM, SamplingParams

    llm = LLM(path, dtype="float32", tensor_parallel_size=tp, enable_expert_parallel=ep, num_kv_blocks=256,
              num_state_slots=streams + 1, max_model_len=512)
    prompts = [[5 + i, 17, 300, 42, 9, 1000, 7] for i in range(streams)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))     # warm-up
    engine = llm.engine
    model_tp = engine.model.tp
    channel = engine.parallel.channel if engine.parallel is not None else None
    for stats in ([model_tp.stats] if model_tp else []) + ([channel.stats] if channel else []):
        stats.reset()
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    steps = tokens                   # one prefill step + tokens - 1 decode steps, all streams together
    out = {"step_ms": 1e3 * seconds / steps,
           "collective_ms": 1e3 * (model_tp.stats.seconds if model_tp else 0.0) / steps,
           "broadcast_ms": 1e3 * (channel.stats.seconds if channel else 0.0) / steps,
           "bytes_per_step": (model_tp.stats.bytes if model_tp else 0) / steps,
           "broadcast_bytes_per_step": (channel.stats.bytes if channel else 0) / steps}
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    from checkpoints import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        # the tests' layer mix (M * E M - E, MTP) at a width where the products are not all overhead
        path, _ = make_checkpoint(Path(tmp) / "ckpt", hidden_size=256, intermediate_size=512, moe_latent_size=128,
                                  moe_intermediate_size=256, moe_shared_expert_intermediate_size=256,
                                  n_routed_experts=16, mamba_num_heads=16, n_groups=4, num_attention_heads=8,
                                  num_key_value_heads=2, tokenizer=False)
        sides = [("TP1", 1, False), ("TP2", 2, False), ("TP2+EP", 2, True)]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
        for _ in range(args.rounds):          # alternate the sides: the machine is shared and noisy
            for name, tp, ep in sides:
                runs[name].append(measure(str(path), tp, ep, args.streams, args.tokens))
    print(f"\nfloat32 random checkpoint (hidden 256, M*EM-E + MTP layers, 16 experts top-2), {args.streams} streams x "
          f"{args.tokens} tokens, greedy, MTP off; medians of {args.rounds} rounds; threads per rank: cores / ranks")
    print("| side | step ms | all-reduce + gather ms | step broadcast ms | comm share | collective bytes/step | "
          "broadcast bytes/step |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, _, _ in sides:
        med = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
        share = (med["collective_ms"] + med["broadcast_ms"]) / med["step_ms"]
        print(f"| {name} | {med['step_ms']:.2f} | {med['collective_ms']:.2f} | {med['broadcast_ms']:.2f} | "
              f"{100 * share:.0f}% | {med['bytes_per_step']:,.0f} | {med['broadcast_bytes_per_step']:,.0f} |")
    print("\nNemotron 3 Super (hidden 4096, 88 layers + MTP *E, vocab 131072, bfloat16 activations, float32 logits): "
          "payload per token, counted by the model's collective wrappers")
    print("| ranks | main step: calls | main step: bytes | MTP draft step: calls | MTP draft: bytes | "
          "ring all-reduce wire bytes per rank (main) |")
    print("|---|--:|--:|--:|--:|--:|")
    for n in (2, 4, 8):
        b = super_bytes_per_token(n)
        # what a ring all-reduce moves per rank is 2 (N-1)/N of its payload; an all-gather (N-1)/N of the result
        print(f"| {n} | {b['main_calls']} | {b['main']:,} | {b['mtp_calls']} | {b['mtp']:,} | "
              f"{int(b['main'] * 2 * (n - 1) / n):,} |")


if __name__ == "__main__":
    main()
