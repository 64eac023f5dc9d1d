"""Each rank reads only its slices: the peak resident memory a TP2 rank adds while loading is at most 0.6x what
one rank loading the whole model adds (measured in fresh processes, /proc/self/status VmHWM against VmRSS
before the load). Measured: one rank adds 136 MB for 137 MB of weights; each TP2 rank 77 MB (0.563x; replicated: norms, routers,
latent projections, the MTP eh_proj)."""
from __future__ import annotations

import json
import subprocess
import sys

from checkpoints import make_checkpoint

MEASURE = """
import json, sys, torch
import nemoh.config, nemoh.loader, nemoh.models.nemotron_h, nemoh.distributed.sharding, nemoh.quant.linear
from nemoh.distributed.layout import ParallelLayout

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# what building any model on the meta device imports first (torch's symbolic-shape machinery, ~150 MB) is the
# interpreter's, not the weights': done before the baseline
with torch.device("meta"):
    nemoh.models.nemotron_h.NemotronHForCausalLM(nemoh.config.NemotronHConfig.from_pretrained(sys.argv[1]))
# (the single-rank build no longer imports it; the sharded load still does, ~150 MB of modules, not weights)
import torch._dynamo  # noqa: E402
before = status("VmRSS")
model = nemoh.loader.load_model(sys.argv[1], dtype="float32", layout=ParallelLayout(int(sys.argv[2]), int(sys.argv[3])))
print(json.dumps({"added": status("VmHWM") - before, "weights": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""


def measure(path: str, world: int, rank: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, path, str(world), str(rank)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tp2_rank_loads_at_most_0_6_of_one_rank(tmp_path):
    # ~190 MB of float32 weights, most of them in experts and MLPs (what tensor parallelism splits)
    path, _ = make_checkpoint(tmp_path / "big", hidden_size=512, moe_latent_size=512, n_routed_experts=16,
                              moe_intermediate_size=512, intermediate_size=2048, tokenizer=False)
    one = measure(str(path), 1, 0)
    assert one["added"] >= 0.9 * one["weights"]
    for rank in (0, 1):
        share = measure(str(path), 2, rank)
        assert share["added"] <= 0.6 * one["added"], (rank, share, one)
