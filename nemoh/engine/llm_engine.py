"""The synchronous engine: requests in, one `step()` at a time, cumulative `RequestOutput`s out.

    step() = schedule -> run the model -> sample (or verify drafts) -> postprocess (stop checks, detokenize,
             prefix-cache resume points) -> draft the next tokens with MTP (speculative decoding only)

A failure while postprocessing one request fails that request only (finish_reason "error"); a failure of the
model forward fails the sequences of that batch, and repeated forward failures are raised as fatal.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from nemoh.engine.config import EngineArgs
from nemoh.engine.detokenizer import IncrementalDetokenizer
from nemoh.engine.grammar_compiler import GrammarCompiler
from nemoh.engine.guided import GrammarMasks, GrammarState, TokenMasks
from nemoh.engine.kv_cache import BlockManager, blocks_for
from nemoh.engine.model_runner import ModelRunner, SeqResult
from nemoh.engine.outputs import CompletionOutput, RequestOutput
from nemoh.engine.prefix_cache import PrefixCache
from nemoh.engine.sampler import Sampler, SamplingRow, compute_logprobs, greedy_verify, rejection_sample
from nemoh.engine.scheduler import Scheduler
from nemoh.engine.sequence import Request, Sequence
from nemoh.engine.spec_decode import DraftRequest, MTPProposer, SpecStats
from nemoh.engine.step_budget import StepTimeBudget
from nemoh.engine.state_cache import StateCache
from nemoh.sampling_params import SamplingParams, StructuredOutput

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_FORWARD_FAILURES = 3


def _needs_no_processing(seq: Sequence) -> bool:
    """Greedy with no penalty, no grammar and min_tokens already reached: the token is the raw logits' argmax."""
    p = seq.params
    return (seq.grammar is None and p.is_greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and seq.num_output_tokens >= p.min_tokens)


class _NoTokenizer:
    """Token-id-only use without tokenizer files: texts stay empty."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`, or None when there is none."""
    from tokenizers import Tokenizer

    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    return Tokenizer.from_file(path) if os.path.isfile(path) else None


@dataclass
class EngineCounters:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_requests_finished: int = 0
    num_requests_failed: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, args: EngineArgs | None = None, parallel=None):
        self.args = args = args or EngineArgs()
        self.model = model
        self.model_config = cfg = model.config
        self.tokenizer = tokenizer
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            logger.warning("max_model_len %d is larger than the checkpoint's max_position_embeddings %d: the model "
                           "was not trained on sequences that long and may degrade past %d tokens",
                           self.max_model_len, cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.eos_token_ids = list(cfg.eos_token_id)
        self.num_speculative_tokens = k = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
        if k and not cfg.has_mtp:
            raise ValueError("speculative_config: method 'mtp' needs a checkpoint with an MTP block "
                             "(num_nextn_predict_layers >= 1)")
        self.runner = ModelRunner(model, args, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, args.block_size)
        self.state_cache = StateCache(self.runner.num_state_slots, self.runner.num_snapshot_slots,
                                      self.runner.first_snapshot_slot)
        self.prefix_cache = None
        if args.enable_prefix_caching:
            self.prefix_cache = PrefixCache(self.block_manager, self.state_cache, self.runner.copy_state,
                                            self.runner.copy_block, keeps_hidden=bool(k))
        self.scheduler = Scheduler(self.block_manager, self.state_cache,
                                   max_num_seqs=min(args.max_num_seqs, self.runner.num_state_slots),
                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                   enable_chunked_prefill=args.enable_chunked_prefill, num_lookahead_tokens=k,
                                   prefix_cache=self.prefix_cache)
        self.sampler = Sampler(cfg.vocab_size, self.eos_token_ids, self.runner.device, args.seed)
        self.proposer = MTPProposer(model, self.runner, k) if k else None
        self.step_budget = (StepTimeBudget(args.max_step_seconds, args.max_num_batched_tokens,
                                           align=args.block_size)
                            if args.max_step_seconds is not None and args.enable_chunked_prefill else None)
        self.spec_stats = SpecStats()
        self.counters = EngineCounters()
        self.requests: dict[str, Request] = {}
        self._consecutive_failures = 0
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.grammar_masks = GrammarMasks(cfg.vocab_size, self.eos_token_ids)
        # tensor parallel: the workers' handle (nemoh.distributed.worker.ParallelDriver), which from here on
        # broadcasts every runner call's inputs to them
        self.parallel = parallel
        if parallel is not None:
            parallel.attach(self)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **engine_args) -> "LLMEngine":
        import nemoh

        args = EngineArgs.from_kwargs(**engine_args)
        tokenizer = None
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
            if tokenizer is None:
                raise ValueError(f"tokenizer: {args.tokenizer} has no tokenizer.json")
        if args.tensor_parallel_size > 1:
            from nemoh.distributed.worker import load_parallel


            model, parallel = load_parallel(os.fspath(model_dir), args)
            try:
                return cls(model, tokenizer or load_tokenizer(model_dir), args, parallel)
            except BaseException:
                parallel.close()
                raise
        model = nemoh.load_model(model_dir, dtype=args.dtype, device=args.device)
        return cls(model, tokenizer or load_tokenizer(model_dir), args)

    def workers_alive(self) -> bool:
        """False once a tensor-parallel worker has died (always True on one rank)."""
        return self.parallel is None or self.parallel.alive()

    def close(self) -> None:
        """End the tensor-parallel workers, if any (idempotent)."""
        if self.parallel is not None:
            self.parallel.close()

    # ---- requests -------------------------------------------------------------------------------------
    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output grammars for this tokenizer (built on first use; thread-safe)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer.json")
                self._grammar_compiler = GrammarCompiler.from_tokenizer(self.tokenizer, self.model_config.vocab_size,
                                                                        self.eos_token_ids)
            return self._grammar_compiler

    def _grammar_state(self, structured: StructuredOutput) -> GrammarState:
        """A sequence's grammar state, having consumed the constraint's prefix. Raises ValueError."""
        matcher = self.grammar_compiler().matcher(structured.grammar, structured.param)
        if structured.prefix_token_ids and not matcher.consume_tokens(list(structured.prefix_token_ids)):
            raise ValueError(f"{structured.param}: the tokens generated so far do not follow the grammar")
        return self.grammar_masks.new_state(matcher, structured.start_after)

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model directory has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request before it is queued; returns its resolved max_tokens. Raises ValueError."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt: must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token {bad!r} is outside the vocabulary [0, {vocab})")
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens do not leave room for any output within "
                             f"max_model_len={self.max_model_len}")
        cache_tokens = self.block_manager.num_blocks * self.args.block_size
        if blocks_for(n + self.num_speculative_tokens + 1, self.args.block_size) > self.block_manager.num_blocks:
            # only with caches sized by hand (num_kv_blocks): the memory plan makes room for max_model_len
            raise ValueError(f"prompt: {n} tokens need more KV cache than the engine has ({cache_tokens} tokens)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not supported by the nemoh engine (use logprobs for generated tokens)")
        if n + max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        return max_tokens

    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> Request:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                prompt_token_ids = self.encode(prompt)
            elif prompt is not None:
                prompt_token_ids = list(prompt)
            else:
                raise ValueError("prompt: give a string or token ids")
        prompt_token_ids = list(prompt_token_ids)
        max_tokens = self.validate_prompt(prompt_token_ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(request_id, text, prompt_token_ids, params, arrival_time=arrival)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(request_id, i, prompt_token_ids, params, max_tokens, arrival, gen)
            if params.structured is not None:
                seq.grammar = self._grammar_state(params.structured)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer or _NoTokenizer(), prompt_token_ids,
                                                     params.skip_special_tokens, params.stop,
                                                     params.include_stop_str_in_output)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.counters.num_prompt_tokens += len(prompt_token_ids)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks and slots; returns its final output (None if unknown)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self._release(seq)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> run -> sample/verify + postprocess -> draft; returns the outputs of touched requests."""
        start = time.perf_counter()
        batch = self.scheduler.schedule(self.step_budget.limit() if self.step_budget else None)
        touched = {s.request_id: self.requests[s.request_id] for s in batch.failed}
        touched.update((s.seq.request_id, self.requests[s.seq.request_id]) for s in batch.scheduled)
        for seq in batch.failed:
            self._fail_unfittable(seq)
        if not batch.is_empty:
            drafts = [d for d in self._postprocess_all(*self._run_and_mask(batch.scheduled)) if d is not None]
            self._propose(drafts)
            for d in drafts:       # finished with MTP and a prefix cache: their MTP cache is complete now
                if d.seq.is_finished:
                    self._release(d.seq)
            if self.step_budget is not None:
                self.step_budget.record(time.perf_counter() - start, batch.num_prefill_tokens)
        return [self._output(req) for req in touched.values()]

    def _fail_unfittable(self, seq: Sequence) -> None:
        self.requests[seq.request_id].error = (f"the request needs more KV cache than the engine has "
                                               f"({self.block_manager.num_blocks} blocks of {self.args.block_size})")
        self._release(seq)

    def _run_and_mask(self, scheduled) -> tuple[list[SeqResult], dict[int, torch.Tensor]]:
        """Run the model; meanwhile a worker thread computes the grammar masks of the constrained sequences that
        sample this step ({seq_id: bitmask}, see guided.py), collected before any matcher is touched again."""
        pending = self.grammar_masks.start([(s.seq.seq_id, s.seq.grammar, s.seq.draft_token_ids[:s.num_draft_tokens])
                                            for s in scheduled if s.seq.grammar is not None and s.samples])
        try:
            results = self._run(scheduled)
        finally:
            masks = pending.result()
        return results, masks

    def _postprocess_all(self, results: list[SeqResult], masks: dict[int, torch.Tensor]) -> list[DraftRequest | None]:
        """Sample the step's plain rows together, then postprocess (and verify) each sequence on its own."""
        sampled = self._sample_plain(results, masks)
        return [self._postprocess_isolated(r, sampled.get(r.scheduled.seq.seq_id), masks.get(r.scheduled.seq.seq_id))
                for r in results]

    def _sample_plain(self, results: list[SeqResult],
                      masks: dict[int, torch.Tensor]) -> dict[int, tuple[list[int], list | None]]:
        """{seq_id: ([token], [logprobs] or None)} for every sequence that samples one token with no drafts to
        verify: one batched sampler call for the rows that need more than the batch's argmax, one logprobs call.

        When a call fails, what it should have given is left to `_postprocess` of each sequence (empty when the
        sampling failed, no logprobs when they did), so that a failure stays with its request.
        """
        plain = [r for r in results
                 if r.logits is not None and not r.scheduled.num_draft_tokens and not r.scheduled.seq.is_finished]
        if not plain:
            return {}
        seqs = [r.scheduled.seq for r in plain]
        tokens = [r.argmax[0] if r.argmax is not None and _needs_no_processing(seq) else None
                  for r, seq in zip(plain, seqs)]
        todo = [i for i, t in enumerate(tokens) if t is None]
        if todo:
            rows = [SamplingRow(seqs[i].params, seqs[i].prompt_token_ids, seqs[i].output_token_ids, seqs[i].generator)
                    for i in todo]
            try:
                todo_tokens = self.sampler.sample(torch.cat([plain[i].logits for i in todo]), rows,
                                                  self._plain_masks([seqs[i] for i in todo], masks))
            except Exception:
                logger.exception("batched sampling failed; sampling each sequence on its own")
                return {}
            for i, t in zip(todo, todo_tokens):
                tokens[i] = t
        logprobs = [None] * len(plain)
        want = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        if want:
            try:
                entries = compute_logprobs(torch.cat([plain[i].logits for i in want]), [tokens[i] for i in want],
                                           [seqs[i].params.logprobs for i in want])
            except Exception:
                logger.exception("batched logprobs failed; computing each sequence's on its own")
            else:
                for i, entry in zip(want, entries):
                    logprobs[i] = [entry]
        return {seq.seq_id: ([t], lp) for seq, t, lp in zip(seqs, tokens, logprobs)}

    def _plain_masks(self, seqs: list[Sequence], masks: dict[int, torch.Tensor]) -> TokenMasks | None:
        """The grammar masks of the constrained ones among one-token rows: those computed during the forward,
        else all computed together now."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        if all(seqs[i].seq_id in masks for i in rows):
            return TokenMasks(torch.cat([masks[seqs[i].seq_id] for i in rows]), rows)
        return TokenMasks(self.grammar_masks.fill([seqs[i].grammar for i in rows]), rows)

    def _postprocess_isolated(self, r: SeqResult, sampled: tuple[list[int], list | None] | None,
                              mask: torch.Tensor | None = None) -> DraftRequest | None:
        req = self.requests[r.scheduled.seq.request_id]
        if r.scheduled.seq.is_finished:      # failed with a sibling completion earlier in this step
            return None
        try:
            return self._postprocess(r, sampled, mask)
        except Exception as e:  # one request's failure must not take the others down
            logger.exception("request %s failed", req.request_id)
            self.fail_request(req.request_id, f"{type(e).__name__}: {e}")
            return None

    def _run(self, scheduled) -> list[SeqResult]:
        try:
            results = self.runner.execute(scheduled)
        except Exception as e:
            self._consecutive_failures += 1
            logger.exception("model forward failed (%d in a row)", self._consecutive_failures)
            if self._consecutive_failures >= MAX_CONSECUTIVE_FORWARD_FAILURES:
                raise
            for s in scheduled:      # their cache state is unknown now: fail them, keep the engine going
                self.fail_request(s.seq.request_id, f"model forward failed: {type(e).__name__}: {e}")
            return []
        self._consecutive_failures = 0
        return results

    def _sample(self, r: SeqResult, mask: torch.Tensor | None = None) -> tuple[list[int], int]:
        """Tokens to append and the number of positions now validly computed; `mask`: the grammar bitmask of the
        rows (1 + drafts, words) when computed during the forward."""
        s, seq = r.scheduled, r.scheduled.seq
        if r.argmax is None:                   # a step that samples nothing (a prompt chunk before its end)
            return [], s.num_new_tokens
        drafts = seq.draft_token_ids[: s.num_draft_tokens]
        if r.argmax is not None and _needs_no_processing(seq):
            tokens = greedy_verify(r.argmax, drafts)
            return self._accept(r, drafts, tokens)
        output = seq.output_token_ids
        rows = [SamplingRow(seq.params, seq.prompt_token_ids, output + drafts[:j], seq.generator)
                for j in range(len(drafts) + 1)]
        masks = None
        if seq.grammar is not None:
            bitmask = mask if mask is not None else self.grammar_masks.draft_masks(seq.grammar, drafts)
            masks = TokenMasks(bitmask, list(range(len(rows))))
        logits = self.sampler.process(r.logits, rows, masks)
        if not drafts:
            return [self.sampler.draw(self.sampler.probs(logits, rows)[0], rows[0])], s.num_new_tokens
        if rows[0].is_greedy:
            tokens = greedy_verify(torch.argmax(logits, dim=-1).tolist(), drafts)
        else:
            tokens = rejection_sample(self.sampler.probs(logits, rows), drafts, None,
                                      lambda: self.sampler.uniform(rows[0]), lambda p: self.sampler.draw(p, rows[0]))
        return self._accept(r, drafts, tokens)

    def _accept(self, r: SeqResult, drafts: list[int], tokens: list[int]) -> tuple[list[int], int]:
        if not drafts:
            return tokens, r.scheduled.num_new_tokens
        accepted = len(tokens) - 1
        self.spec_stats.record(len(drafts), accepted)
        if accepted < len(drafts):
            self.runner.rollback_mamba_state(r.scheduled.seq, r.intermediate, accepted)
        return tokens, 1 + accepted

    def _postprocess(self, r: SeqResult, sampled: tuple[list[int], list | None] | None,
                     mask: torch.Tensor | None = None) -> DraftRequest | None:
        """sampled: this sequence's tokens and logprobs from `_sample_plain`, or None to sample (or verify) here
        (with `mask`, its grammar bitmask computed during the forward, if any)."""
        seq = r.scheduled.seq
        if sampled is None:
            tokens, num_computed = self._sample(r, mask)
            logprobs = None
        else:
            (tokens, logprobs), num_computed = sampled, r.scheduled.num_new_tokens
        seq.num_computed_tokens = r.start + num_computed
        seq.draft_token_ids = []
        if self.prefix_cache is not None:
            self._cache_prefix(r, num_computed)
        if tokens and logprobs is None and seq.params.logprobs is not None:
            logprobs = compute_logprobs(r.logits[: len(tokens)], tokens, [seq.params.logprobs] * len(tokens))
        for i, t in enumerate(tokens):
            self._append_token(seq, t, logprobs[i] if logprobs else None)
            if seq.is_finished:
                return self._finished(r, num_computed)
        if self.proposer is None:
            return None
        return self._draft_request(r, num_computed, needs_draft=bool(tokens))

    def _draft_request(self, r: SeqResult, num_computed: int, needs_draft: bool) -> DraftRequest:
        """The MTP pass over the positions computed this step (and the resume point's last one, right after
        resuming from the prefix cache: its MTP entry depends on this sequence's next token)."""
        seq, start, hidden, resumed = r.scheduled.seq, r.start, r.hidden[:num_computed], None
        if seq.resume_hidden is not None:
            resumed = seq.resume_hidden
            start, hidden = start - 1, torch.cat([resumed, hidden])
            seq.resume_hidden = None
        return DraftRequest(seq, start, hidden, needs_draft=needs_draft, resumed_hidden=resumed)

    def _cache_prefix(self, r: SeqResult, num_computed: int) -> None:
        """Register the newly computed full blocks; save a resume point where the prefix cache asked for one
        (`pause_at`). The state slot holds the state after `num_computed_tokens` tokens now."""
        seq, cache = r.scheduled.seq, self.prefix_cache
        if self.proposer is not None:
            seq.last_hidden = r.hidden[num_computed - 1:num_computed].clone()
        cache.register(seq)
        if seq.num_computed_tokens in seq.pause_at:
            seq.pause_at = [p for p in seq.pause_at if p > seq.num_computed_tokens]
            cache.save(seq, seq.last_hidden)

    def _finished(self, r: SeqResult, num_computed: int) -> DraftRequest | None:
        """Release a sequence that just finished, or, with MTP and a prefix cache, have it fill its MTP cache
        first (released in `step`) so that its end can be a resume point."""
        seq = r.scheduled.seq
        # a stop among accepted drafts leaves the state past the last kept token: no resume point then
        consistent = seq.num_computed_tokens < seq.num_tokens
        if self.prefix_cache is not None and self.proposer is not None and consistent:
            return self._draft_request(r, num_computed, needs_draft=False)
        self._release(seq)
        return None

    def _append_token(self, seq: Sequence, token: int, logprob: dict | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        self.counters.num_generation_tokens += 1
        if logprob is not None:
            if self.tokenizer is not None:
                for tid, lp in logprob.items():
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise RuntimeError(f"token {token} breaks the grammar: {seq.grammar.error}")
        stop_str = seq.detokenizer.add_token(token)
        n_out = seq.num_output_tokens
        if seq.grammar is not None and seq.grammar.is_finished:      # the grammar allows nothing more
            seq.finish("stop", stop_str)
        elif stop_str is not None:
            seq.finish("stop", stop_str)
        elif n_out >= p.min_tokens and not p.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop", None)
        elif n_out >= p.min_tokens and token in p.stop_token_ids:
            seq.finish("stop", token)
        elif n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    def _propose(self, drafts: list[DraftRequest]) -> None:
        if not drafts:
            return
        try:
            self.proposer.propose(drafts)
        except Exception:  # drafts are an optimisation: without them the next step is a plain decode
            logger.exception("MTP drafting failed; continuing without drafts")
            for d in drafts:
                d.seq.draft_token_ids = []

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        if (self.prefix_cache is not None and seq.finish_reason in ("stop", "length")
                and seq.num_computed_tokens < seq.num_tokens):
            # the next turn resumes here when it repeats the reply verbatim
            self.prefix_cache.save(seq, seq.last_hidden, evict_first=True)
        self.scheduler.finish(seq)
        seq.detokenizer.flush()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix (as vLLM's `reset_prefix_cache`); False when prefix caching is off."""
        if self.prefix_cache is None:
            return False
        self.prefix_cache.reset()
        return True

    def fail_request(self, request_id: str, error: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        req.error = error
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("error")
            self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        finished = req.is_finished
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.visible_text(s.is_finished),
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for s in req.seqs
        ]
        if finished and self.requests.pop(req.request_id, None) is not None:
            self.counters.num_requests_finished += 1
            self.counters.num_requests_failed += req.error is not None
            for s in req.seqs:
                self.counters.finish_reasons[s.finish_reason] = self.counters.finish_reasons.get(s.finish_reason, 0) + 1
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outputs, finished=finished,
                             num_cached_tokens=max(s.num_cached_tokens for s in req.seqs), error=req.error)

    def stats(self) -> dict:
        spec, plan = self.spec_stats, self.runner.plan
        measured = {} if plan.measured_transient is None else {
            # what the start-up profiling step measured (nemoh.engine.memory_profile); the caches were sized from it
            "memory_plan_transient_measured_bytes": plan.measured_transient}
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_unfinished_requests": len(self.requests),
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "kv_block_size": self.args.block_size,
            "mamba_slots_used": self.state_cache.num_used_slots,
            "mamba_slots_total": self.state_cache.num_slots,
            "prompt_tokens_total": self.counters.num_prompt_tokens,
            "generation_tokens_total": self.counters.num_generation_tokens,
            "requests_finished_total": self.counters.num_requests_finished,
            "requests_failed_total": self.counters.num_requests_failed,
            "preemptions_total": self.scheduler.num_preemptions,
            "spec_num_speculative_tokens": self.num_speculative_tokens,
            "spec_drafted_tokens_total": spec.num_drafted,
            "spec_accepted_tokens_total": spec.num_accepted,
            "spec_acceptance_rate": spec.acceptance_rate,
            "spec_mean_accepted_length": spec.mean_accepted_length,
            "enable_prefix_caching": self.prefix_cache is not None,
            **(self.prefix_cache.stats() if self.prefix_cache is not None else {}),
            # the memory plan the caches were sized from (nemoh.engine.memory_plan), in bytes
            "memory_plan_weights_bytes": plan.resident_bytes,
            "memory_plan_transient_bytes": plan.transient_bytes,
            "memory_plan_transient_estimated_bytes": plan.estimated_transient_bytes,
            **measured,
            "memory_plan_cache_bytes": self.runner.cache_bytes,
            "memory_plan_kv_bytes_per_token": plan.kv_bytes_per_token,
            "memory_plan_mamba_bytes_per_seq": plan.mamba_bytes_per_seq,
        }
