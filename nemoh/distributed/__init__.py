"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on a CPU).

One module per job:
  layout.py       which slice of every layer kind a rank holds (heads, Mamba heads with their groups, MLP width,
                  experts, vocabulary), the per-rank config, and the size checks (errors name the flag)
  collectives.py  the process group's all-reduce / all-gather, counting bytes and time per call
  layers.py       the vocabulary-parallel embedding; where the partial sums are reduced
  sharding.py     the per-rank module tree (built on the meta device) and which checkpoint slice each tensor reads
  launch.py       starting the ranks: spawned worker processes on one machine, or torchrun's environment
  step_channel.py the driver's broadcast of each step's inputs to the workers
  worker.py       the worker's loop (the same ModelRunner calls as the driver's), and the driver-side proxy

Every rank holds the same layers with 1/N of their width: attention by heads (KV heads replicated when there are
fewer than ranks), Mamba-2 by heads with their groups, MLP / shared expert / routed experts by intermediate size
(or, with expert parallelism, whole routed experts by expert), embeddings and lm_head by vocabulary. Each layer
ends in one all-reduce of its partial output; the logits are all-gathered. At world size 1 nothing here runs.
"""
