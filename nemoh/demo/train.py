"""Train the demo model from scratch on the synthetic IT-helpdesk corpus: `nemoh train --out DIR`.

The recipe, in the order a step runs:
1. Data: `corpus.generate("train", n, seed)`, rendered with the chat template and tokenized in a background
   process (`--workers`), a few chunks ahead of the trainer. The loss mask comes from `training_segments`:
   only the assistant turns the model must produce are targets. Examples are grouped into windows, sorted by
   length inside a window and cut into batches of about `--batch-tokens` tokens padded on the right to one
   common length (the model's uncached path is fastest on equal lengths; a causal model never lets right
   padding reach earlier positions). With `--copy-every N` every N-th batch is one of the copy task instead
   (`CopyBatches`: 64 short rows, about a quarter of a ticket step's time), its loss logged as copy_loss.
2. Loss: the main LM loss (position t predicts token t+1) plus `--mtp-weight` times the MTP loss (the MTP
   step at t takes token t+1 and the main hidden at t after norm_f, and predicts token t+2), both over the
   target positions only; the lm_head runs on those positions alone.
3. Update: AdamW on fp32 master weights, the forward and backward under bfloat16 autocast, gradient clipping,
   linear warm-up then cosine decay. Expert load is balanced without an auxiliary loss (DeepSeek-V3): after
   each step every router's `e_score_correction_bias` moves by `--bias-rate` towards the under-used experts.
4. Budget: with `--minutes` the cosine schedule runs on the fraction of the wall-clock budget used (so it
   ends at the minimum exactly when time is up, however fast the machine is); with `--steps` on the step
   fraction; with both, whichever is further along.
5. Output (every `--save-minutes` and at the end): a Hugging Face checkpoint that `nemoh.load_model` reads
   (config.json, model.safetensors in bfloat16 with the router in float32, tokenizer files, chat template,
   generation_config.json), `train_log.jsonl`, and `trainer_state.pt` (fp32 weights + optimizer) for
   `--resume`. The final checkpoint is re-loaded and its logits compared with the trained model's.
6. `--eval N`: greedy-decode N held-out prompts and score the tool calls and plain replies.
7. `--ema DECAY`: also keep an exponential moving average of the weights (and router biases), updated after
   every step, and save it as a second checkpoint in `OUT/ema` (evaluated too with `--eval`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nemoh.config import NemotronHConfig
from nemoh.demo import corpus
from nemoh.models import ForwardContext, NemotronHForCausalLM
from nemoh.models.mamba2 import Mamba2Mixer
from nemoh.models.moe import TopKRouter
from nemoh.models.norm import GatedGroupRMSNorm, RMSNorm

DEFAULT_CONFIG = Path(__file__).parent / "demo_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PAD_ID = 3  # "<pad>" in the demo tokenizer
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


# ============================================================================================ data

_worker: dict = {}


def _init_encoder(worker: bool = False) -> None:
    from tokenizers import Tokenizer

    if worker:
        # Below the trainer's priority: the trainer's OpenMP threads stall at every barrier when another
        # busy process takes their core, so the encoder only fills the gaps (it needs ~2% of a core).
        os.nice(10)
        torch.set_num_threads(1)
    _worker["tokenizer"] = Tokenizer.from_file(str(corpus.MODEL_DIR / "tokenizer.json"))
    _worker["template"] = corpus.load_template()


def encode_example(example: corpus.Example, tokenizer, template) -> tuple[list[int], list[bool]]:
    """Token ids and the target mask of one example, cut after its last target token."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_target in corpus.training_segments(example, template):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [is_target] * len(piece)
    last = max(i for i, m in enumerate(mask) if m) if any(mask) else len(ids) - 1
    return ids[:last + 1], mask[:last + 1]


def _encode_chunk(examples: list[corpus.Example]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for ex in examples:
        ids, mask = encode_example(ex, _worker["tokenizer"], _worker["template"])
        out.append((torch.tensor(ids, dtype=torch.int16), torch.tensor(mask, dtype=torch.bool)))
    return out


class BatchStream:
    """Endless batches (ids (B, T) int64, mask (B, T) bool) from the train split, epoch after epoch.

    Examples are tokenized `window` at a time (in a worker process when workers > 0, at most two windows
    ahead), and each window becomes length-sorted batches in random order. `position` (examples consumed
    so far, whole windows) lets a resumed run continue where the data left off.
    """

    def __init__(self, n: int, seed: int, batch_tokens: int, window: int = 512, workers: int = 1,
                 position: int = 0, pad_multiple: int = 64):
        if n <= 0:
            raise ValueError(f"examples: must be positive, got {n}")
        self.examples = corpus.generate("train", n, seed)
        self.seed, self.batch_tokens, self.window, self.position = seed, batch_tokens, window, position
        self.pad_multiple = pad_multiple  # few distinct shapes: oneDNN builds kernels per shape
        self.pool = None
        if workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_encoder, initargs=(True,))
        else:
            _init_encoder()

    @property
    def epoch(self) -> float:
        return self.position / len(self.examples)

    def _windows(self, start: int):
        n = len(self.examples)
        pos = start
        while True:
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            if epoch > 0:  # later epochs see the examples in a new order
                random.Random(f"epoch:{self.seed}:{epoch}").shuffle(order)
            chunk = [self.examples[i] for i in order[offset:offset + self.window]]
            pos += len(chunk)
            yield pos, chunk

    def __iter__(self):
        pending: deque = deque()
        windows = self._windows(self.position)
        while True:
            while len(pending) < 3:
                end, chunk = next(windows)
                job = self.pool.apply_async(_encode_chunk, (chunk,)) if self.pool else None
                pending.append((end, job, chunk))
            end, job, chunk = pending.popleft()
            encoded = job.get() if job is not None else _encode_chunk(chunk)
            for batch in self._batches(encoded, end):
                yield batch
            self.position = end

    def _batches(self, encoded, end: int):
        rng = random.Random(f"batches:{self.seed}:{end}")
        encoded = sorted(encoded, key=lambda e: len(e[0]))
        groups, group = [], []
        for item in encoded:
            longest = max(len(item[0]), max((len(g[0]) for g in group), default=0))
            padded = -(-longest // self.pad_multiple) * self.pad_multiple
            if group and padded * (len(group) + 1) > self.batch_tokens:
                groups.append(group)
                group = []
            group.append(item)
        if group:
            groups.append(group)
        rng.shuffle(groups)
        for group in groups:
            length = -(-max(len(ids) for ids, _ in group) // self.pad_multiple) * self.pad_multiple
            ids = torch.full((len(group), length), PAD_ID, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.bool)
            for i, (seq, m) in enumerate(group):
                ids[i, :len(seq)] = seq.long()
                mask[i, :len(m)] = m
            yield ids, mask

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


class CopyBatches:
    """Endless batches of the copy task: rows of random tokens that hold a key and a value (`U` + 5 digits,
    `INC-` + 4 digits, an e-mail address, or with `mix` a few random tokens after a random key), then later
    `=`, the key and the same value; the targets are the repeated value. Tickets need exactly this (an id or
    an e-mail copied from the request or a tool result into a call), and the ticket corpus alone does not
    teach it within the budget: on its own the task is learned in a few hundred cheap steps
    (`benchmarks/copy_probe.py`)."""

    # E-mail rows are single characters, as the tokenizer writes an address (`build_tokenizer.EMAIL_CHARS`):
    # local part, optionally a separator and more, "@", a domain, "." and a top-level domain.
    # No "tokens" rows (a few random vocabulary tokens) by default: they stayed at chance for the whole hour
    # (8.3 nats a token on runs/demo19, and alone for 550 steps in `copy_probe.py --kind tokens`), a quarter of
    # the copy rows spent on nothing (docs/demo_history.md, session 16).
    MIX = {"user_id": 0.4, "ticket_id": 0.25, "email": 0.35}

    def __init__(self, seed: int, rows: int = 64, length: int = 64, mix: dict[str, float] | None = None):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(corpus.MODEL_DIR / "tokenizer.json"))
        tid = tokenizer.token_to_id
        self.digits = [tid(str(d)) for d in range(10)]
        self.u, self.inc, self.dash, self.eq = tid("U"), tid("INC"), tid("-"), tid("=")
        self.letters = [tid(c) for c in "abcdefghijklmnopqrstuvwxyz"]
        self.at, self.dot, self.separators = tid("@"), tid("."), [tid("."), tid("_"), tid("-")]
        self.vocab = tokenizer.get_vocab_size()
        self.rng = random.Random(f"copy:{seed}")
        self.rows, self.length = rows, length
        mix = mix or self.MIX
        self.kinds, self.weights = list(mix), list(mix.values())

    def _value(self) -> tuple[list[int], list[int]]:
        """(key, value) of one row, of a kind drawn from the mix."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind == "user_id":
            return [self.u], [self.rng.choice(self.digits) for _ in range(5)]
        if kind == "ticket_id":
            return [self.inc, self.dash], [self.rng.choice(self.digits) for _ in range(4)]
        if kind == "email":
            letters = lambda lo, hi: [self.rng.choice(self.letters) for _ in range(self.rng.randint(lo, hi))]
            local = letters(1, 7) + ([self.rng.choice(self.separators)] + letters(1, 7) if self.rng.random() < 0.5
                                     else [])
            return [self.rng.randrange(100, self.vocab)], local + [self.at] + letters(1, 7) + [self.dot] + letters(2, 4)
        return ([self.rng.randrange(100, self.vocab)],
                [self.rng.randrange(100, self.vocab) for _ in range(self.rng.randint(3, 6))])

    def __iter__(self):
        while True:
            ids = torch.tensor([[self.rng.randrange(100, self.vocab) for _ in range(self.length)]
                                for _ in range(self.rows)])
            mask = torch.zeros(self.rows, self.length, dtype=torch.bool)
            ids[:, 0] = 1
            for row in range(self.rows):
                key, value = self._value()
                first = key + value
                again = [self.eq] + key + value
                a = self.rng.randint(1, self.length // 2 - len(first))
                b = self.rng.randint(a + len(first), self.length - len(again))
                ids[row, a:a + len(first)] = torch.tensor(first)
                ids[row, b:b + len(again)] = torch.tensor(again)
                mask[row, b + len(again) - len(value):b + len(again)] = True
            yield ids, mask


def with_copy_batches(stream, copies, every):
    """(ids, mask, is_copy): the ticket batches with a copy batch as every `every`-th one (none when 0).
    `every` may be a callable, asked before each ticket batch (see `CopySchedule`)."""
    interval = every if callable(every) else (lambda: every)
    copies = iter(copies) if interval() else None
    since = 0
    for ids, mask in stream:
        yield ids, mask, False
        since += 1
        if copies is not None and since >= interval() - 1:
            since = 0
            yield *next(copies), True


class CopySchedule:
    """A copy batch every `every` steps until the copy task is learned (mean copy loss of the last `window`
    copy batches below `threshold`), then every `learned_every` steps, which keeps it learned: on
    runs/demo19 the copy was learned by minute 20, and a third of the remaining compute went on re-doing it."""

    def __init__(self, every: int, learned_every: int, threshold: float = 0.05, window: int = 10):
        self.every, self.learned_every, self.threshold = every, learned_every, threshold
        self.recent: deque = deque(maxlen=window)
        self.learned_at_step: int | None = None

    def __call__(self) -> int:
        return self.every if self.learned_at_step is None else self.learned_every

    def record(self, copy_loss: float, step: int) -> None:
        self.recent.append(copy_loss)
        if (self.learned_at_step is None and len(self.recent) == self.recent.maxlen
                and sum(self.recent) / len(self.recent) < self.threshold):
            self.learned_at_step = step


# ============================================================================================ model

def load_config(path: str | os.PathLike) -> tuple[NemotronHConfig, dict]:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return NemotronHConfig.from_dict(raw), raw


@torch.no_grad()
def init_weights(model: NemotronHForCausalLM, raw_config: dict) -> None:
    """As transformers' NemotronH `_init_weights`: normal(0, initializer_range) for linears, embeddings and
    routers; norms 1; router bias 0; Mamba A_log = log(1..H), D = 1, dt_bias = softplus⁻¹(dt) with
    dt ~ logU(time_step_min, time_step_max); Mamba out_proj kaiming-uniform / sqrt(num_layers)."""
    config = model.config
    std = float(raw_config.get("initializer_range", 0.02))
    rescale = raw_config.get("rescale_prenorm_residual", True)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TopKRouter):
            nn.init.normal_(module.weight, std=std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, (RMSNorm, GatedGroupRMSNorm)):
            nn.init.ones_(module.weight)
    for module in model.modules():
        if isinstance(module, Mamba2Mixer):
            h = module.num_heads
            module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(h) * (hi - lo) + lo).clamp(min=config.time_step_floor)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if rescale:
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                module.out_proj.weight /= math.sqrt(config.num_hidden_layers)


def compute_losses(model: NemotronHForCausalLM, ids: torch.Tensor, mask: torch.Tensor, mtp_steps: int = 1):
    """ids, mask: (B, T). Returns (lm_loss, mtp_loss or None), means over the target tokens.

    With `mtp_steps` > 1 the MTP block is also trained as it drafts at k > 1: step j takes token t+j and
    step j-1's output at t, and predicts t+j+1; mtp_loss is the mean over the steps."""
    b, t = ids.shape
    ctx = ForwardContext.for_full_forward(b, t)
    flat = ids.reshape(-1)
    hidden = model.forward_hidden(flat, ctx)                                     # (B*T, hidden)
    pos = torch.zeros_like(mask)
    pos[:, :-1] = mask[:, 1:]                                                    # t predicts t+1
    idx = pos.reshape(-1).nonzero().squeeze(1)
    lm_loss = F.cross_entropy(model.compute_logits(hidden[idx]), flat[idx + 1])
    if model.mtp is None:
        return lm_loss, None
    losses = []
    for step in range(1, mtp_steps + 1):
        shifted = torch.cat([ids[:, step:], ids.new_full((b, step), PAD_ID)], dim=1).reshape(-1)
        hidden = model.mtp_forward(shifted, hidden, ctx)                         # (token t+j, h) -> t+j+1
        target = torch.zeros_like(mask)
        target[:, :-(step + 1)] = mask[:, step + 1:]
        idx_j = target.reshape(-1).nonzero().squeeze(1)
        losses.append(F.cross_entropy(model.compute_logits(hidden[idx_j]), flat[idx_j + step + 1]))
    return lm_loss, sum(losses) / len(losses)


class RouterBalancer:
    """Aux-loss-free load balancing (DeepSeek-V3 §2.1.2): count each router's expert choices during the
    step, then b_i += rate * sign(mean load - load_i) on its `e_score_correction_bias`."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counts = {id(r): torch.zeros(r.num_experts) for r in self.routers}
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router, inputs, output) -> None:
        ids = output[1].detach().reshape(-1)
        self.counts[id(router)] += torch.bincount(ids, minlength=router.num_experts).float()

    @torch.no_grad()
    def update(self) -> float:
        """Apply the bias update; returns the worst max/mean load ratio over the routers (1.0 = balanced)."""
        worst = 1.0
        for r in self.routers:
            load = self.counts[id(r)]
            if load.sum() > 0:
                mean = load.mean()
                r.e_score_correction_bias += self.rate * torch.sign(mean - load)
                worst = max(worst, float(load.max() / mean))
            load.zero_()
        return worst

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class WeightAverage:
    """An exponential moving average of a model's floating-point state (weights and router biases), in
    float32. The decay starts low and grows to `decay` ((1 + n) / (10 + n) after n updates), so that the
    average does not remember the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        floating = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.names = list(floating)
        self.tensors = [v.detach().float().clone() for v in floating.values()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.tensors, [state[k].detach().float() for k in self.names], 1.0 - d)
        self.updates += 1

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A copy of `model` holding the averaged state."""
        out = copy.deepcopy(model)
        out.load_state_dict({**out.state_dict(), **dict(zip(self.names, self.tensors))})
        return out

    def state_dict(self) -> dict:
        return {"updates": self.updates, "tensors": dict(zip(self.names, self.tensors))}

    def load_state_dict(self, saved: dict) -> None:
        self.updates = saved["updates"]
        self.tensors = [saved["tensors"][k].float().clone() for k in self.names]


def lr_at(step: int, progress: float, peak: float, warmup: int, min_ratio: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * warm * (min_ratio + (1.0 - min_ratio) * cosine)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


# ============================================================================================ checkpoints

def save_checkpoint(model: NemotronHForCausalLM, raw_config: dict, out: Path) -> None:
    """The Hugging Face layout `nemoh.load_model` reads: weights in bfloat16 except the fp32 routers."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    keep_fp32 = {f"{name}.{t}" for name, m in model.named_modules() if getattr(m, "keep_fp32", False)
                 for t in ("weight", "e_score_correction_bias")}
    tensors = {name: t.detach().to(torch.float32 if name in keep_fp32 else torch.bfloat16).contiguous()
               for name, t in model.state_dict().items()}
    _atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {**raw_config, "torch_dtype": "bfloat16"}
    _atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    gen = {"bos_token_id": 1, "eos_token_id": config.get("eos_token_id", [2, 11]), "pad_token_id": PAD_ID,
           "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    _atomic(out / "generation_config.json", lambda p: p.write_text(json.dumps(gen, indent=2) + "\n"))
    for name in TOKENIZER_FILES:
        shutil.copyfile(corpus.MODEL_DIR / name, out / name)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def saved_copy(model: NemotronHForCausalLM) -> NemotronHForCausalLM:
    """The training model with its weights rounded as `save_checkpoint` stores them."""
    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for module in ref.modules():
            if getattr(module, "keep_fp32", False):
                continue
            for p in module.parameters(recurse=False):
                p.copy_(p.to(torch.bfloat16).float())
    return ref


def verify_checkpoint(model: NemotronHForCausalLM, out: Path, sample: torch.Tensor) -> float:
    """Re-load `out` with nemoh.load_model (fp32) and return the max |logit difference| on `sample` (1, T)
    against the training model's weights as saved. Raises when they disagree."""
    from nemoh.loader import load_model

    loaded = load_model(out, dtype="float32", progress=False)
    ref = saved_copy(model)
    want, got = ref(sample), loaded(sample)
    diff = float((want - got).abs().max())
    if not diff <= 1e-3:
        raise RuntimeError(f"{out}: the saved checkpoint's logits differ from the trained model's by {diff}")
    return diff


# ============================================================================================ evaluation

@torch.inference_mode()
def greedy_generate(model: NemotronHForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                    eos_ids: list[int], block_size: int = 16) -> list[list[int]]:
    """Greedy decoding of several prompts at once through the model's cached path (KV blocks and Mamba
    state slots registered in a ForwardContext): one prefill, then one token per sequence per step."""
    cfg = model.config
    n = len(prompts)
    blocks = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
    dev = model.device
    kv = {i: tuple(torch.zeros(n * blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, device=dev)
                   for _ in range(2)) for i in cfg.attention_layer_ids}
    mamba = {i: (torch.zeros(n, cfg.mamba_conv_dim, cfg.conv_kernel - 1, device=dev),
                 torch.zeros(n, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, device=dev))
             for i in cfg.mamba_layer_ids}

    def run(seqs: list[int], new: list[list[int]], done: list[int]) -> list[int]:
        starts, slots = [0], []
        for s, toks, c in zip(seqs, new, done):
            starts.append(starts[-1] + len(toks))
            slots += [tables[s][p // block_size] * block_size + p % block_size for p in range(c, c + len(toks))]
        ctx = ForwardContext(query_start_loc=starts, context_lens=list(done), state_slots=list(seqs),
                             block_tables=[tables[s] for s in seqs], block_size=block_size,
                             slot_mapping=torch.tensor(slots, device=dev), kv_caches=kv, mamba_caches=mamba)
        flat = torch.tensor([t for toks in new for t in toks], device=dev)
        hidden = model.forward_hidden(flat, ctx)
        return model.compute_logits(hidden[torch.tensor(starts[1:], device=dev) - 1]).argmax(-1).tolist()

    outputs: list[list[int]] = [[] for _ in range(n)]
    lengths = [len(p) for p in prompts]
    active = list(range(n))
    next_tokens = run(active, prompts, [0] * n)
    while active:
        still = []
        for s, tok in zip(active, next_tokens):
            outputs[s].append(tok)
            if tok not in eos_ids and len(outputs[s]) < max_new_tokens:
                still.append(s)
        active = still
        if active:
            next_tokens = run(active, [[outputs[s][-1]] for s in active], [lengths[s] + len(outputs[s]) - 1
                                                                        for s in active])
    return outputs


def score_reply(text: str, example: corpus.Example) -> dict:
    """Split off the reasoning, parse the qwen3_coder tool calls and compare with `example.expected`."""
    from nemoh.chat.tools import Qwen3CoderToolParser

    for stop in ("<|im_end|>", "</s>"):
        text = text.split(stop)[0]
    thinking = example.template_kwargs.get("enable_thinking", True)
    closed = "</think>" in text
    content = text.split("</think>", 1)[1] if closed else ("" if thinking else text)
    parsed = Qwen3CoderToolParser(example.tools).extract(content)
    exp = example.expected
    calls = parsed.tool_calls
    if exp["type"] == "tool_call":
        name_ok = len(calls) == 1 and calls[0].name == exp["name"]
        args_ok = name_ok and json.loads(calls[0].arguments) == exp["arguments"]
        return {"kind": "tool_call", "parsed": bool(calls), "name": name_ok, "correct": args_ok,
                "think_closed": closed or not thinking}
    ok = not calls and "<tool_call>" not in content and bool((parsed.content or "").strip())
    return {"kind": "no_tool", "parsed": True, "name": ok, "correct": ok, "think_closed": closed or not thinking}


def evaluate(model: NemotronHForCausalLM, n: int, seed: int = 0, max_new_tokens: int = 160,
             batch: int = 16, show: int = 0) -> dict:
    """Greedy-decode `n` held-out prompts and report the tool-call and no-tool accuracy."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(corpus.MODEL_DIR / "tokenizer.json"))
    template = corpus.load_template()
    examples = corpus.generate("heldout", n, seed)
    prompts = [tokenizer.encode(corpus.prompt_text(ex, template), add_special_tokens=False).ids for ex in examples]
    was_training = model.training
    model.eval()
    scores = []
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, n, batch):
                outs = greedy_generate(model, prompts[i:i + batch], max_new_tokens, list(model.config.eos_token_id))
                for j, out in enumerate(outs):
                    text = tokenizer.decode(out, skip_special_tokens=False)
                    scores.append(score_reply(text, examples[i + j]))
                    if i + j < show:
                        print(f"--- {examples[i + j].expected}\n{text}")
    finally:
        model.train(was_training)
    calls = [s for s in scores if s["kind"] == "tool_call"]
    plain = [s for s in scores if s["kind"] == "no_tool"]
    rate = lambda items, key: sum(s[key] for s in items) / len(items) if items else float("nan")
    return {"n": n, "accuracy": rate(scores, "correct"), "tool_calls": len(calls),
            "tool_parsed": rate(calls, "parsed"), "tool_name": rate(calls, "name"), "tool_exact": rate(calls, "correct"),
            "no_tool": len(plain), "no_tool_correct": rate(plain, "correct"),
            "think_closed": rate(scores, "think_closed")}


# ============================================================================================ training

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nemoh train", description="Train the demo model from scratch on the "
                                "synthetic IT-helpdesk corpus (CPU, bfloat16 autocast).")
    p.add_argument("--out", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config.json (default: the demo's)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 60 without --steps)")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps")
    p.add_argument("--examples", type=int, default=30000, help="train examples generated (repeat if exhausted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch, padding included")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--mtp-steps", type=int, default=2, help="recursive MTP steps trained (drafting depth)")
    p.add_argument("--copy-every", type=int, default=0,
                   help="make every N-th step a batch of the copy task (0: none; N >= 2)")
    p.add_argument("--copy-every-learned", type=int, default=None,
                   help="once the copy task is learned (loss < 0.05), every N-th step only (default: --copy-every)")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="router bias update per step (gamma)")
    p.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint interval")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (0: in the trainer)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (slow; for comparison)")
    p.add_argument("--resume", default=None, help="directory with a trainer_state.pt to continue from")
    p.add_argument("--eval", type=int, default=0, help="greedy-decode N held-out prompts at the end")
    p.add_argument("--eval-show", type=int, default=0, help="print the first N evaluation replies")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of a moving average of the weights saved to OUT/ema (0: none)")
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        args.minutes = 60.0
    for key in ("minutes", "steps", "batch_tokens", "lr"):
        value = getattr(args, key)
        if value is not None and value < 0:
            p.error(f"--{key.replace('_', '-')}: must be >= 0, got {value}")
    if args.copy_every == 1 or args.copy_every < 0:
        p.error(f"--copy-every: must be 0 (off) or at least 2, got {args.copy_every}")
    if args.copy_every_learned is None:
        args.copy_every_learned = args.copy_every
    if args.copy_every and args.copy_every_learned < 2:
        p.error(f"--copy-every-learned: must be at least 2, got {args.copy_every_learned}")
    return args


def summarize(log: list[dict]) -> str:
    """A plot-free view of the loss curve: loss averaged around a few points of the run."""
    if not log:
        return "no steps logged"
    lines = [f"{'step':>7} {'tokens':>11} {'min':>6} {'loss':>7} {'lm':>7} {'mtp':>7} {'lr':>9}"]
    for i in sorted({min(len(log) - 1, round(f * (len(log) - 1))) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)}):
        window = log[max(0, i - 2):i + 3]
        mean = lambda k: sum(r[k] for r in window) / len(window)
        r = log[i]
        lines.append(f"{r['step']:>7} {r['tokens']:>11,} {r['elapsed'] / 60:>6.1f} {mean('loss'):>7.3f} "
                     f"{mean('lm_loss'):>7.3f} {mean('mtp_loss'):>7.3f} {r['lr']:>9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    config, raw_config = load_config(args.config)
    torch.manual_seed(args.seed)
    model = NemotronHForCausalLM(config)
    init_weights(model, raw_config)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    average = WeightAverage(model, args.ema) if args.ema else None
    state = {"step": 0, "tokens": 0, "targets": 0, "elapsed": 0.0, "position": 0}
    if args.resume:
        saved = torch.load(Path(args.resume) / STATE_FILE, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["counters"])
        if average is not None and "ema" in saved:
            average.load_state_dict(saved["ema"])
    budget = args.minutes * 60 if args.minutes else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({config.hybrid_override_pattern} + MTP "
          f"{''.join('*' if t == 'attention' else 'E' if t == 'moe' else '-' for t in config.mtp_layer_types) if config.has_mtp else 'none'}); "
          f"budget: {f'{args.minutes:g} min' if budget else '-'} / {args.steps or '-'} steps; "
          f"batch {args.batch_tokens} tokens; threads {torch.get_num_threads()}", flush=True)

    stream = BatchStream(args.examples, args.seed, args.batch_tokens, workers=args.workers,
                         position=state["position"])
    balancer = RouterBalancer(model, args.bias_rate)
    log_path = out / LOG_FILE
    log_mode = "a" if args.resume else "w"
    log: list[dict] = []
    bar = _progress_bar(args.steps)
    copy_schedule = CopySchedule(args.copy_every, args.copy_every_learned)
    run_start = time.time() - state["elapsed"]  # the budget covers earlier runs too when resuming
    last_save = time.time()
    sample = None
    step_times: deque = deque(maxlen=20)
    window = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "n": 0, "copy": 0.0, "copies": 0, "tokens": 0, "time": 0.0}
    model.train()
    try:
        with open(log_path, log_mode) as log_file:
            for ids, mask, is_copy in with_copy_batches(stream, CopyBatches(args.seed) if args.copy_every else (),
                                                        copy_schedule):
                elapsed = time.time() - run_start
                progress = max(state["step"] / args.steps if args.steps else float(args.steps == 0),
                               elapsed / budget if budget else 0.0)
                if progress >= 1.0:
                    break
                if sample is None:
                    sample = ids[:1, :256]
                lr = lr_at(state["step"], progress, args.lr, args.warmup, args.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t_step = time.time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
                    lm_loss, mtp_loss = compute_losses(model, ids, mask, args.mtp_steps)
                    loss = lm_loss + args.mtp_weight * mtp_loss if mtp_loss is not None else lm_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                imbalance = balancer.update()
                if average is not None:
                    average.update(model)
                dt = time.time() - t_step
                step_times.append(dt)
                state["step"] += 1
                state["tokens"] += int(ids.numel())
                state["targets"] += int(mask.sum())
                state["position"] = stream.position
                if is_copy:      # logged apart: the ticket losses stay comparable with runs without it
                    window["copy"] += float(lm_loss.detach())
                    copy_schedule.record(float(lm_loss.detach()), state["step"])
                    if copy_schedule.learned_at_step == state["step"]:
                        print(f"copy task learned at step {state['step']} ({elapsed / 60:.1f} min): a copy batch "
                              f"every {copy_schedule()} steps from now", flush=True)
                    window["copies"] += 1
                else:
                    window["loss"] += float(loss.detach())
                    window["lm"] += float(lm_loss.detach())
                    window["mtp"] += float(mtp_loss.detach()) if mtp_loss is not None else 0.0
                    window["n"] += 1
                window["tokens"] += int(ids.numel())
                window["time"] += dt
                if state["step"] % args.log_every == 0 or state["step"] == 1:
                    state["elapsed"] = time.time() - run_start
                    k = max(window["n"], 1)
                    rec = {"step": state["step"], "tokens": state["tokens"], "loss": window["loss"] / k,
                           "lm_loss": window["lm"] / k, "mtp_loss": window["mtp"] / k, "lr": lr,
                           "elapsed": round(state["elapsed"], 1), "tok_s": round(window["tokens"] / window["time"]),
                           "max_load": round(imbalance, 2), "epoch": round(stream.epoch, 3)}
                    if window["copies"]:
                        rec["copy_loss"] = window["copy"] / window["copies"]
                    log.append(rec)
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    window = dict.fromkeys(window, 0)
                    if bar is not None:
                        if not args.steps and budget:
                            bar.total = max(state["step"], int(state["step"] / max(progress, 1e-9)))
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", mtp=f"{rec['mtp_loss']:.3f}",
                                        tok_s=rec["tok_s"], lr=f"{lr:.1e}", refresh=False)
                    else:
                        print(f"step {rec['step']} loss {rec['loss']:.4f} lm {rec['lm_loss']:.4f} "
                              f"mtp {rec['mtp_loss']:.4f} lr {lr:.2e} {rec['tok_s']} tok/s "
                              f"load {imbalance:.2f} {rec['elapsed'] / 60:.1f} min", flush=True)
                if bar is not None:
                    bar.update(1)
                if time.time() - last_save > args.save_minutes * 60:
                    state["elapsed"] = time.time() - run_start
                    _save_all(model, optimizer, raw_config, out, state, average)
                    last_save = time.time()
    finally:
        stream.close()
        balancer.remove()
        if bar is not None:
            bar.close()
    state["elapsed"] = time.time() - run_start
    averaged = _save_all(model, optimizer, raw_config, out, state, average)
    model.eval()
    sample = sample if sample is not None else torch.tensor([[1, 10, 100, 11]])
    diff = verify_checkpoint(model, out, sample)
    print(f"\nsaved {out} after {state['step']} steps, {state['tokens']:,} tokens ({state['targets']:,} targets), "
          f"{state['elapsed'] / 60:.1f} min, {state['tokens'] / max(state['elapsed'], 1e-9):.0f} tok/s overall, "
          f"epoch {stream.epoch:.2f}; reload check: max |logit diff| {diff:.2e}")
    print(summarize(log))
    finals = [(model, out)]
    if averaged is not None:
        averaged.eval()
        verify_checkpoint(averaged, out / "ema", sample)
        finals.append((averaged, out / "ema"))
        print(f"saved {out / 'ema'}: the weights averaged with decay {args.ema:g} over {average.updates} steps")
    for trained, where in finals if args.eval else ():
        t = time.time()
        result = evaluate(trained, args.eval, seed=args.seed, show=args.eval_show)
        (where / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"eval of {where} ({time.time() - t:.0f}s): " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    print(f"total {(time.time() - t0) / 60:.1f} min")
    return 0


def _save_all(model, optimizer, raw_config: dict, out: Path, state: dict,
              average: WeightAverage | None = None) -> nn.Module | None:
    """Checkpoint the model (and the averaged copy, which is returned) plus the state to resume from."""
    save_checkpoint(model, raw_config, out)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "counters": dict(state)}
    averaged = None
    if average is not None:
        averaged = average.averaged_model(model)
        save_checkpoint(averaged, raw_config, out / "ema")
        payload["ema"] = average.state_dict()
    _atomic(out / STATE_FILE, lambda p: torch.save(payload, p))
    return averaged


def _progress_bar(total: int | None):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
