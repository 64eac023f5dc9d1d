"""How fast the demo architecture learns to copy an id, trained on nothing else.

Trained on tickets alone for its hour, the demo model wrote ids of the right shape with the wrong digits (it
never learned to copy from the ticket). This probe asks whether the architecture can learn the copy at all
within such a budget: from scratch (the demo config and initialisation, AdamW, bfloat16 autocast, as
`nemoh train`), on the trainer's copy-task rows (`CopyBatches`) restricted to user ids: random tokens
holding `U` + 5 random digits, then later `=` `U` and the same 5 digits; the loss is on those 5 copied digits
only. Chance is ln(10) = 2.30 nats a digit; exact ids need nearly 0. It prints the loss and the per-digit
accuracy every `--every` steps.

`--kind tokens` asks the same of rows of a few random vocabulary tokens after a random key (chance is
ln(vocab) = 8.3 nats a token): in session 16 they stayed at chance for 550 steps, as they had for the whole
hour inside runs/demo19's training (the trainer's mix has none since session 17).

    python benchmarks/copy_probe.py [--kind user_id|ticket_id|email|tokens] [--steps 400] [--lr 3e-3]
                                    [--batch 64] [--length 64]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nemoh.demo import train
from nemoh.models.forward_context import ForwardContext
from nemoh.models.nemotron_h import NemotronHForCausalLM

DEMO = Path(__file__).resolve().parent.parent / "nemoh" / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="user_id", choices=["user_id", "ticket_id", "email", "tokens"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    rows = iter(train.CopyBatches(seed=0, rows=args.batch, length=args.length, mix={args.kind: 1.0}))
    config, raw = train.load_config(DEMO / "demo_config.json")
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config)
    train.init_weights(model, raw)
    optimizer = train.make_optimizer(model, args.lr, 0.1)
    print(f"copy probe ({args.kind} rows): {args.batch} rows x {args.length} tokens a step, lr {args.lr}, "
          f"{torch.get_num_threads()} threads; chance is 2.303 nats a digit (8.3 a token for tokens rows)")
    print(f"{'step':>5} {'loss':>7} {'accuracy':>9} {'seconds':>8}")
    start, losses, correct, total = time.perf_counter(), [], 0, 0
    for step in range(1, args.steps + 1):
        ids, mask = next(rows)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 30)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b, t = ids.shape
            hidden = model.forward_hidden(ids.reshape(-1), ForwardContext.for_full_forward(b, t))
            targets = mask.reshape(-1).nonzero().squeeze(1)
            logits = model.compute_logits(hidden[targets - 1])            # position t-1 predicts token t
            loss = torch.nn.functional.cross_entropy(logits, ids.reshape(-1)[targets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == ids.reshape(-1)[targets]).sum())
        total += len(targets)
        if step % args.every == 0:
            print(f"{step:>5} {sum(losses) / len(losses):>7.3f} {correct / total:>9.1%} "
                  f"{time.perf_counter() - start:>8.0f}", flush=True)
            losses, correct, total = [], 0, 0


if __name__ == "__main__":
    main()
