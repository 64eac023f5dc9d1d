"""Accuracy of the quantized formats against BF16, as in the model card's BF16 / FP8 / NVFP4 columns.

For one model (a random NemotronH checkpoint by default, or `--model DIR`, e.g. the demo model) the script
writes FP8 and NVFP4 copies with `nemoh quantize`, runs BF16 and both copies on the same token sequences,
and prints per format: mean KL(p_bf16 || p_quant) of the next-token distributions, the largest KL, and the
top-1 agreement with BF16. Usage: python benchmarks/quant_accuracy.py [--model DIR] [--sequences N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import nemoh
from nemoh.quant.quantize import quantize_checkpoint

REPO = Path(__file__).resolve().parent.parent


def random_checkpoint(path: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import make_checkpoint

    make_checkpoint(path, with_mtp=False, dtype=torch.bfloat16, hidden_size=256, head_dim=64,
                    mamba_head_dim=32, moe_intermediate_size=256, moe_latent_size=128,
                    moe_shared_expert_intermediate_size=512, intermediate_size=512, n_routed_experts=16,
                    num_experts_per_tok=4)
    return path


def sample_sequences(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """Held-out demo conversations when the tokenizer is there, else random ids."""
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.exists():
        from tokenizers import Tokenizer

        from nemoh.demo.corpus import generate, render

        tok = Tokenizer.from_file(str(tokenizer))
        seqs = [tok.encode(render(ex)).ids[-length:] for ex in generate("heldout", count, seed=7)]
        return seqs
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 4096, (length,), generator=g).tolist() for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = args.model or random_checkpoint(tmp / "bf16")
        seqs = sample_sequences(src, args.sequences, args.length)
        calib = tmp / "calib.txt"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        calib.write_text("\n".join(tok.decode(s, skip_special_tokens=False).replace("\n", " ") for s in seqs[:8]))
        copies = {"BF16": src}
        for fmt in ("fp8", "nvfp4"):
            copies[fmt.upper()] = tmp / fmt
            quantize_checkpoint(src, tmp / fmt, fmt=fmt, calib_file=calib if fmt == "fp8" else None, progress=False)
        logits = {}
        for name, path in copies.items():
            model = nemoh.load_model(path, dtype="bfloat16")
            logits[name] = [model(torch.tensor([s]))[0].float() for s in seqs]
        print(f"model: {'random NemotronH (bf16)' if args.model is None else args.model}; "
              f"{len(seqs)} sequences x {len(seqs[0])} tokens")
        print(f"{'format':8} {'mean KL':>10} {'max KL':>10} {'top-1 agree':>12}")
        for name in copies:
            kls, agree = [], []
            for ref, got in zip(logits["BF16"], logits[name]):
                p, q = ref.log_softmax(-1), got.log_softmax(-1)
                kls.append((p.exp() * (p - q)).sum(-1))
                agree.append((ref.argmax(-1) == got.argmax(-1)).float())
            kl, ag = torch.cat(kls), torch.cat(agree)
            print(f"{name:8} {kl.mean().item():10.2e} {kl.max().item():10.2e} {ag.mean().item():12.4f}")


if __name__ == "__main__":
    main()
