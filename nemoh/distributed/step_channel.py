"""The driver's messages to the workers: what each ModelRunner call of a step needs, broadcast from rank 0.

A message is a small tuple of plain Python values (method name, token ids, block tables, state slots; never a
tensor: every rank computes its own hidden states and caches), pickled by `broadcast_object_list` over a gloo
group whose timeout is long, so that idle workers wait for the next step for as long as the server idles.
A dead peer closes its connection, which ends the wait with an error instead of a hang.
"""
from __future__ import annotations

import pickle
import time

import torch.distributed as dist

from nemoh.distributed.collectives import CommStats


class StepChannel:
    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.stats = CommStats()

    def send(self, message: tuple) -> None:
        """Driver (rank 0): broadcast `message` to every worker."""
        start = time.perf_counter()
        dist.broadcast_object_list([message], src=0, group=self.group)
        self.stats.calls += 1
        self.stats.bytes += len(pickle.dumps(message))
        self.stats.seconds += time.perf_counter() - start

    def receive(self) -> tuple:
        """Worker: wait for the driver's next message."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
