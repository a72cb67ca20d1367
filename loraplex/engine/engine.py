"""Engine: add_request / abort / step. One step = schedule → execute → postprocess."""

from __future__ import annotations

import logging
import random
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from loraplex.adapters.loader import AdapterLoader, LoadedAdapter
from loraplex.adapters.ref import parse_ref, shown_id
from loraplex.config import EngineConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.memory import size_kv_cache
from loraplex.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from loraplex.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from loraplex.engine.sequence import UNREAD, Sequence, SequenceStatus
from loraplex.engine.speculative import Drafter, MedusaDrafter, NgramDrafter
from loraplex.engine.step_timer import NO_TIMER, NullTimer
from loraplex.kv.block_pool import BlockPool, KVCache, blocks_needed
from loraplex.lora.adapter import AdapterError
from loraplex.lora.manager import LoRAManager
from loraplex.lora.medusa import MedusaHeads, load_medusa
from loraplex.lora.merge import MergeSpec, merged_future
from loraplex.model.attention import attention_op
from loraplex.model.cuda_graphs import build_decode_graphs
from loraplex.model.decoder import DecoderConfig
from loraplex.model.loader import build_model, open_checkpoint
from loraplex.model.quant import weight_bytes
from loraplex.model.runner import Launched, ModelRunner, non_finite_logits
from loraplex.paths import resolve_model
from loraplex.runtime import keep_freed_memory
from loraplex.sampling import SamplerOutput
from loraplex.sampling.structured import GrammarCompiler

log = logging.getLogger(__name__)
LOAD_POLL_S = 0.05


class EngineStepError(Exception):
    """The engine failed while serving this request (HTTP 500): a step that failed as a whole, or this
    request's own state (its detokenizer, grammar, tensors) breaking; the engine keeps serving others."""


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device, dtype = config.model.torch_device(), config.model.torch_dtype()
        keep_freed_memory(device)  # reuse per-step host buffers rather than fault them in again each step
        self.quantize = config.model.resolved_quantize()
        # `--quantize int4` keeps a pre-quantized checkpoint's own 4-bit layers as they are stored.
        ckpt = open_checkpoint(resolve_model(config.model.model), keep_int4=self.quantize == "int4")
        self.tokenizer = ckpt.tokenizer
        self.eos_token_ids = frozenset(ckpt.eos_token_ids)
        self.hf_config = ckpt.hf_config
        self.model_name = ckpt.name
        self.max_model_len = config.model.max_model_len or ckpt.hf_config.max_position_embeddings
        self.linear_backend = config.model.resolved_linear_backend()
        self.attention_backend = config.model.resolved_attention_backend()
        model = build_model(ckpt, dtype, device, self.max_model_len, self.linear_backend, self.quantize)
        self.weight_bytes = weight_bytes(model)
        """Bytes of the base model's weights by storage dtype (`/info`, metrics)."""
        model.use_attention(attention_op(self.attention_backend, device))
        cfg = model.config
        # The adapter slots first: their buffers are device memory the KV cache's size must leave room for.
        self.lora = (LoRAManager(model, config.lora, config.lora.resolved_dtype(dtype))
                     if config.lora.max_loras > 0 else None)
        block_size = config.cache.block_size
        kv_bytes, kv_detail = config.cache.kv_cache_bytes, "--kv-cache-bytes"
        if config.cache.num_blocks is None and kv_bytes is None:
            budget = size_kv_cache(model, device, config.cache.gpu_memory_utilization,
                                   config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs)
            kv_bytes, kv_detail = budget.bytes, budget.detail
        num_blocks = config.cache.num_blocks or max(1, (kv_bytes or 0) // KVCache.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype))
        log.info("KV cache: %d blocks of %d tokens (%s)", num_blocks, block_size,
                 "--num-blocks" if config.cache.num_blocks else kv_detail)
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        self.pool = BlockPool(num_blocks)
        # The adapter exchange: sources → disk → host tier on worker threads; the manager is the device tier.
        self.adapters = AdapterLoader.from_config(config.adapters, self.lora.parse) if self.lora else None
        # request id → (its sequence, its adapter's load, the adapter as the request named it)
        self._loading: dict[str, tuple[Sequence, Future[LoadedAdapter], str]] = {}
        self._failed: list[RequestOutput] = []
        self.async_output = config.scheduler.resolved_async_output(device)
        """Whether a step's outputs are made while the next step's forward runs (see `step`)."""
        self.async_scheduling = config.scheduler.resolved_async_scheduling(device)
        """Whether a step is queued before the last step's tokens are read (see `step`)."""
        self._inflight: Launched | None = None
        """Async scheduling: the queued step whose tokens are not read yet."""
        self._readers: set[Sequence] = set()
        """Unfinished requests that want their prompt's logprobs (the runner scores prompt rows on the host):
        while there are any, every step waits for the last one's tokens."""
        self._pending: list[tuple[Sequence, int, int]] = []
        """The last step's tokens whose outputs are still to be made (`_emit`): (request, token, its output's
        length with that token)."""
        self._late: list[Sequence] = []
        """Requests `_emit` ended (a stop string, a broken detokenizer) for `_settle` to finish."""
        self._kept: dict[Sequence, int] | None = None
        """Medusa drafts: each request that took tokens in the last step → the sampled row of its last one."""
        self.last_step_rows = 0
        """Requests that got a token in the last step."""
        self.drafter: Drafter | None = None
        """Speculative decoding's draft proposer (loraplex/engine/speculative.py); None when it is off."""
        self._medusa: MedusaDrafter | None = None
        self._draft_failures = 0
        """Medusa drafting calls that raised (each costs that step's drafts)."""
        spec = config.scheduler
        if spec.speculative_tokens > 0 and spec.speculative_method == "medusa":
            lora = self.lora
            base = _base_heads(spec.speculative_medusa_heads, model.config) if spec.speculative_medusa_heads else None
            self.drafter = self._medusa = MedusaDrafter(
                spec.speculative_tokens, model.draft_logits,
                lambda identity: (w.medusa if lora is not None and (w := lora.weights_of(identity)) else None),
                base, device, dtype,
                NgramDrafter(spec.speculative_tokens, spec.speculative_ngram_max, spec.speculative_ngram_min)
                if spec.speculative_medusa_lookup else None)
        elif spec.speculative_tokens > 0:
            self.drafter = NgramDrafter(spec.speculative_tokens, spec.speculative_ngram_max,
                                        spec.speculative_ngram_min, spec.speculative_history_tokens)
        self.draft_tokens = self.accepted_tokens = self.verify_steps = 0
        """Speculative decoding so far: drafts proposed, drafts accepted, and request-steps that verified some."""
        self.scheduler = Scheduler(config.scheduler, self.pool, block_size, self.lora, num_slots=config.lora.max_loras,
                                   enable_prefix_caching=config.cache.enable_prefix_caching, drafter=self.drafter)
        self.runner = ModelRunner(model, self.kv_cache, device)
        self.runner.graphs, self.cuda_graphs = build_decode_graphs(
            model, self.kv_cache, device, enforce_eager=config.model.enforce_eager,
            attention_backend=self.attention_backend, lora_backend=self.lora.backend if self.lora else None,
            dora_slots=self.lora.dora_slots if self.lora else None,
            max_batch=min(config.model.cuda_graph_max_batch or config.scheduler.max_num_seqs,
                          config.scheduler.max_num_seqs),
            max_model_len=self.max_model_len, time_limit_s=config.model.cuda_graph_capture_s)
        """What `/info` says of the decode CUDA graphs (loraplex/model/cuda_graphs.py)."""
        self.timer: NullTimer = NO_TIMER
        """Times each step's phases when set to a `StepTimer` (loraplex.bench.overhead)."""
        self._seqs: dict[str, Sequence] = {}
        self._grammars: GrammarCompiler | None = None  # built on the first structured request (about 1 s)
        if self.drafter is not None and self.cuda_graphs["enabled"]:
            log.warning("speculative decoding: steps with drafts run eager, without the decode CUDA graphs; "
                        "it pays where several drafts are accepted per step")
        log.info("base weights: %s", ", ".join(f"{b / 2**20:.0f} MiB {name}" for name, b in self.weight_bytes.items()))
        log.info("loaded %s (%s) on %s as %s; backends: %s linears, %s attention, %s LoRA; %d KV blocks of %d "
                 "tokens; async output %s; async scheduling %s; CUDA graphs %s", self.model_name, cfg.architecture,
                 device, dtype, self.linear_backend, self.attention_backend, self.lora.backend if self.lora else "no",
                 num_blocks, block_size, "on" if self.async_output else "off", "on" if self.async_scheduling else "off",
                 "on" if self.cuda_graphs["enabled"] else f"off ({self.cuda_graphs['reason']})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, adapter_id: str | None = None, *,
                    adapter_source: str | None = None, adapter_token: str | None = None,
                    merge: MergeSpec | None = None, truncate: int | None = None, every_token: bool = True) -> None:
        """Queue a request. `truncate` keeps only the last `truncate` prompt tokens. With `every_token=False`
        `step` reports the request only with its first token and when it finishes (or fails): a caller that
        does not stream spares the step an output per request per token.

        `adapter_id` (None or "" = the base model) names an adapter of `adapter_source` (default `local`:
        a folder; `hub`: `org/name[@revision]`; `s3`: `s3://bucket/prefix`), fetched with `adapter_token`
        if it needs one. The adapter loads on the exchange's worker threads while other requests keep
        running; if it cannot be loaded, this request alone finishes with `error` set (an AdapterError).
        `merge` instead serves a weighted merge of several adapters (ids of `adapter_source`).
        """
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if truncate is not None:
            if truncate < 1:
                raise ValueError(f"truncate must be >= 1, got {truncate}")
            prompt_token_ids = prompt_token_ids[-truncate:]
        self._check_lengths(prompt_token_ids, params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params) if self.tokenizer else None
        seq = Sequence(request_id, list(prompt_token_ids), params, seed, detok, prompt)
        seq.every_token = every_token
        if params.prompt_logprobs:
            self._readers.add(seq)
        # A grammar allows EOS only where its JSON is complete, so there EOS ends it even with ignore_eos.
        eos_ends = not params.ignore_eos or params.json_schema is not None
        seq.stop_ids = frozenset(params.stop_token_ids) | (self.eos_token_ids if eos_ends else frozenset())
        seq.max_output = min(params.max_new_tokens, self.max_model_len - len(seq.prompt_token_ids))
        if params.prompt_logprobs:
            seq.prompt_logprobs = [None] * len(prompt_token_ids)
        if params.json_schema is not None:
            seq.grammar = self._grammar_compiler().matcher(params.json_schema)
        if adapter_id or merge is not None:
            if self.adapters is None or self.lora is None:
                raise ValueError(f"adapter {adapter_id or merge!r} requested, but this engine runs with max_loras=0")
            if adapter_id and merge is not None:
                raise ValueError("give at most one of adapter_id and merge")
            ids = merge.ids if merge is not None else (adapter_id or "",)
            refs = [parse_ref(i, adapter_source) for i in ids]
            for ref in refs:
                if ref.source not in self.config.adapters.sources:
                    raise ValueError(f"adapter source {ref.source!r} is not enabled; enabled: "
                                     f"{', '.join(self.config.adapters.sources)}")
            parts = [self.adapters.request(ref, adapter_token) for ref in refs]
            self._seqs[request_id] = seq
            self._loading[request_id] = (seq, parts[0] if merge is None else
                                         merged_future(merge, parts, self.config.lora.max_lora_rank,
                                                                       self.lora.prepare),
                                         "+".join(ids))
            return
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured output (json_schema) needs the model's tokenizer; this model has none")
            self._grammars = GrammarCompiler(self.tokenizer, self.runner.model.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _check_lengths(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The admission limits: ValueError naming the numbers for a prompt this engine must refuse."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.runner.model.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        limits = self.config.scheduler
        num_prompt = len(prompt_token_ids)
        total = num_prompt + params.max_new_tokens
        if limits.max_input_length is not None and num_prompt > limits.max_input_length:
            raise ValueError(f"the prompt has {num_prompt} tokens; max_input_length is {limits.max_input_length} "
                             f"(truncate keeps only the last tokens)")
        if limits.max_total_tokens is not None and total > limits.max_total_tokens:
            raise ValueError(f"prompt + max_new_tokens = {num_prompt} + {params.max_new_tokens} = {total} tokens; "
                             f"max_total_tokens is {limits.max_total_tokens}")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens; the model takes at most "
                             f"{self.max_model_len - 1} to leave room for one new token")
        longest = min(total, self.max_model_len)  # generation stops at max_model_len
        if blocks_needed(longest, self.kv_cache.block_size) > self.pool.num_blocks:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens do not fit the KV cache "
                             f"({self.pool.num_blocks * self.kv_cache.block_size} tokens)")
        cap = limits.max_batch_total_tokens
        if cap is not None and longest > cap:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens exceed max_batch_total_tokens ({cap})")

    def abort(self, request_id: str) -> None:
        if self._pending:  # its last token's output (async output) is not wanted any more
            self._pending = [entry for entry in self._pending if entry[0].request_id != request_id]
        seq = self._seqs.pop(request_id, None)
        if self._loading.pop(request_id, None) is not None:
            if seq is not None:
                self._readers.discard(seq)
            return  # it holds nothing yet
        if seq is not None and seq.status is not SequenceStatus.FINISHED:
            seq.finish_reason = FinishReason.ABORTED
            self._finish(seq)

    def speculation_info(self) -> dict[str, object] | None:
        """What `/info` says of speculative decoding (None when it is off)."""
        if self.drafter is None:
            return None
        cfg = self.config.scheduler
        return {"method": cfg.speculative_method, "tokens": cfg.speculative_tokens,
                "ngram": [cfg.speculative_ngram_min, cfg.speculative_ngram_max],
                "history_tokens": cfg.speculative_history_tokens, "max_batch": cfg.speculative_max_batch,
                "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "verify_steps": self.verify_steps,
                "mean_accepted": round(self.accepted_tokens / self.verify_steps, 3) if self.verify_steps else None}

    @property
    def num_loading(self) -> int:
        """Requests waiting for their adapter to load (not in the scheduler yet)."""
        return len(self._loading)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_work() or bool(self._loading) or bool(self._pending)
                or self._inflight is not None)

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that produced a token or finished
        (including requests whose adapter failed to load, with `error` set), but for the tokens between a
        request's first and last when it was added with `every_token=False`. `last_step_rows` is then
        the number of requests that got a token.

        With `async_output` a step's tokens become outputs (text, stop strings, the output objects) while
        the next step's forward runs, so each output comes one step later; a step with nothing to run
        returns the last ones. A request whose stop string shows up then has been scheduled for one more
        token: that token is dropped and the request ends as it would have without the overlap.

        With `async_scheduling` a step is queued (`_launch`) before the last step's tokens are read: each
        request that sampled in it holds an UNREAD placeholder token, which the scheduler counts and the
        queued step's inputs take on the device; the tokens are read, and their outputs made, after the next
        step's forward is queued (`_land`), and that step's sampling is queued after, with them read. A request
        ended by a token it sampled (EOS, a stop token) has then been queued once more; that row is dropped.
        While a request scores its prompt, steps wait for the last one's tokens as without it."""
        timer = self.timer
        timer.start()
        self.last_step_rows = 0  # an empty step samples nothing: the metric must not repeat the last count
        self._admit_loaded()
        outputs, self._failed = self._failed, []
        launch = self.async_scheduling and not self._readers and self.drafter is None
        if self._inflight is not None and not launch:
            outputs += self._land()  # this step waits for the last one's tokens
        sched = self.scheduler.schedule()
        if self._inflight is not None and (sched.empty or not self._fed(sched)):
            # The queued step's tokens are needed first; the requests they end leave this step, and if that
            # empties it, the requests they made room for are scheduled instead.
            outputs += self._land()
            sched.chunks = [c for c in sched.chunks if c.seq.status is not SequenceStatus.FINISHED]
            if sched.empty:
                sched = self.scheduler.schedule()
        pending, self._pending = self._pending, []
        if sched.empty:
            outputs += self._emit(pending)
            self._settle()
            if self._loading and not outputs:  # only loads pending: wait for one rather than spin
                wait([f for _, f, _ in self._loading.values()], timeout=LOAD_POLL_S, return_when=FIRST_COMPLETED)
            return outputs
        timer.lap("schedule")
        if launch:
            return outputs + self._launch(sched, pending)

        def alongside() -> None:
            outputs.extend(self._emit(pending))

        # A failure of the batch as a whole (the forward pass) raises; one of a request's own (its inputs,
        # its logits, its sampling) comes back in `broken` and ends that request alone.
        if self.lora is not None:
            self.lora.ready()  # this step's kernels wait (on the GPU) for the adapter slots it loaded
        sampled, result, broken = self.runner.execute(sched, timer, alongside if pending else None)
        # A speculating request samples several rows: count requests.
        self.last_step_rows = len(set(map(id, sampled))) if sched.num_drafts else len(sampled)
        timer.lap("sample")
        broken_seqs = {seq for seq, _ in broken}
        for chunk in sched.chunks:
            if chunk.seq not in broken_seqs:  # a broken chunk's KV was not computed: never cache it
                # Of a chunk with drafts, only its first token's KV is known good; `_advance` adds the accepted.
                chunk.seq.num_computed_tokens += chunk.num_new_tokens - len(chunk.drafts)
        # A request that ended while this step ran (its stop string, in `alongside`) has had its output.
        outputs += [self._fail(seq, error) for seq, error in broken if seq.finish_reason is None]
        outputs += self._advance(sampled, result)
        if self._medusa is not None and self._kept:
            self._draft_medusa(self._kept)
        self._settle()
        if not self.async_output:
            pending, self._pending = self._pending, []
            outputs += self._emit(pending)
            self._settle()
        timer.lap("postprocess")
        timer.stop(sched)
        return outputs

    @staticmethod
    def _fed(sched: SchedulerOutput) -> bool:
        """Whether every chunk of a request with an UNREAD token is the decode of that token (its input
        then comes from the queued step, on the device); one that is not (a request preempted and admitted
        again in one schedule) needs the token on the host first."""
        return all(c.num_new_tokens == 1 and c.seq.num_computed_tokens == c.seq.num_tokens - 1
                   for c in sched.chunks if c.seq.unread)

    def _launch(self, sched: SchedulerOutput, pending: list[tuple[Sequence, int, int]]) -> list[RequestOutput]:
        """Async scheduling: queue `sched` (its inputs take the queued step's tokens on the device), read the
        queued step's tokens and make their outputs while its forward runs, then queue its sampling. Each
        sampling request gets an UNREAD placeholder token until its token is read, so the next schedule
        counts it."""
        timer = self.timer
        if self.lora is not None:
            self.lora.ready()
        previous, self._inflight = self._inflight, None  # (read below, inside the launch, or never again)
        outputs: list[RequestOutput] = []

        def between() -> None:
            outputs.extend(self._emit(pending))  # a last step that ran without the overlap left these
            if previous is not None:
                outputs.extend(self._land(previous))
            else:
                self._settle()

        launched = self.runner.launch(sched, previous, timer, between)
        broken = {seq: e for seq, e in launched.broken}
        for chunk in sched.chunks:
            # A request the reading ended is out of the step: its row is dropped when the tokens are read.
            if chunk.seq not in broken and chunk.seq.status is not SequenceStatus.FINISHED:
                chunk.seq.num_computed_tokens += chunk.num_new_tokens
        for chunk in launched.sampled:
            if chunk.seq.status is not SequenceStatus.FINISHED:
                chunk.seq.output_token_ids.append(UNREAD)
                chunk.seq.unread += 1
        self._inflight = launched
        self.last_step_rows = len(launched.sampled)
        timer.lap("sample")
        # (A request the reading ended is no longer the step's to fail.)
        outputs += [self._fail(seq, e) for seq, e in broken.items() if seq.status is not SequenceStatus.FINISHED]
        timer.lap("postprocess")
        timer.stop(sched)
        return outputs

    def _land(self, launched: Launched | None = None) -> list[RequestOutput]:
        """Read the queued step's tokens (`launched`, else the one in flight) in place of their requests'
        UNREAD placeholders, end the requests they end, and make their outputs. A request that ended since
        the step was queued (aborted, a stop string, a token before) has its row dropped."""
        if launched is None:
            launched, self._inflight = self._inflight, None
        assert launched is not None
        tokens, finite, logprobs = launched.read()
        outputs: list[RequestOutput] = []
        pending: list[tuple[Sequence, int, int]] = []
        for chunk, token, ok, logprob in zip(launched.sampled, tokens, finite, logprobs, strict=True):
            seq = chunk.seq
            if seq.status is SequenceStatus.FINISHED:
                continue
            out = seq.output_token_ids
            n = len(out) - seq.unread + 1  # this token is the n-th output
            seq.unread -= 1
            if not ok:
                del out[n - 1:]  # its placeholder is no token (the step that read it is not counted yet)
                outputs.append(self._fail(seq, non_finite_logits(seq)))
                continue
            out[n - 1] = token
            try:  # per request: its grammar breaking ends it alone
                _take(seq, token, logprob, n)
                if seq.finish_reason is not None:
                    self._finish(seq)  # drops what it sampled after this token
                    self._seqs.pop(seq.request_id, None)
            except Exception as e:
                outputs.append(self._fail(seq, e))
                continue
            pending.append((seq, token, n))
        outputs += self._emit(pending)
        self._settle()
        return outputs

    def wait_for_adapter_loads(self, timeout: float | None = None) -> None:
        """Block until every pending adapter load has finished, and admit those requests (tests, warm-up)."""
        wait([f for _, f, _ in self._loading.values()], timeout=timeout)
        self._admit_loaded()

    def _admit_loaded(self) -> None:
        """Requests whose adapter finished loading join the scheduler; failed ones finish with the error."""
        for request_id, (seq, future, name) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[request_id]
            try:
                loaded = future.result()
            except Exception as e:  # whatever a load raised (an OSError on a bad path ...) is this request's
                self._seqs.pop(request_id, None)
                self._readers.discard(seq)
                seq.status = SequenceStatus.FINISHED
                self._failed.append(self._failed_output(seq, _adapter_error(name, e)))
                continue
            assert self.lora is not None
            seq.adapter = loaded.identity
            self.lora.hold(loaded.identity, loaded.weights)
            self.scheduler.add(seq)

    def _advance(self, sampled: list[ScheduledChunk], result: SamplerOutput | None) -> list[RequestOutput]:
        """Append each row's token and end the requests it ends by token alone (an EOS or stop token, the
        length, a complete grammar), so the next step's schedule is right; the tokens go to `_pending` for
        `_emit`. Returns the outputs of requests that failed here. This loop runs for every request at
        every step: the common row takes one call (`_take`, shared with `_land`; ~0.1 µs).

        The rows of a chunk with drafts (consecutive) are verified here: row i's token is kept when row i
        is the first or the draft before it was accepted (equal to row i - 1's token), and each accepted
        draft's KV counts as computed; what the rejected ones hold goes back (`Scheduler.trim`)."""
        failed: list[RequestOutput] = []
        if result is None:
            return failed
        pending = self._pending
        kept = self._kept = {} if self._medusa is not None else None  # request → the row of its last token
        last: ScheduledChunk | None = None
        row = 0
        live = True  # whether this row's token is kept (its drafts so far accepted)
        for i, (chunk, token, logprob) in enumerate(zip(sampled, result.token_ids, result.logprobs, strict=True)):
            seq = chunk.seq
            if chunk is last:
                row += 1
                if not live:
                    continue
            else:
                last, row = chunk, 0
            live = False
            if seq.finish_reason is not None:  # it ended at a stop string while this step ran: a token too many
                continue
            try:  # per request: its grammar breaking ends it alone
                seq.output_token_ids.append(token)
                _take(seq, token, logprob, len(seq.output_token_ids))
                if chunk.drafts:
                    live = self._verify(chunk, row, token)
                if seq.finish_reason is not None:
                    self._finish(seq)
                    self._seqs.pop(seq.request_id, None)
                pending.append((seq, token, len(seq.output_token_ids)))
                if kept is not None:
                    kept[seq] = i
            except Exception as e:
                failed.append(self._fail(seq, e))
        return failed

    def _draft_medusa(self, kept: dict[Sequence, int]) -> None:
        """The next step's Medusa drafts of the requests that took tokens, from this step's hidden states;
        none while more requests run than speculate (the heads' LM-head rows would cost a large batch
        for nothing)."""
        assert self._medusa is not None
        hidden = self.runner.sample_hidden
        if hidden is not None and len(self.scheduler.running) <= self.config.scheduler.speculative_max_batch:
            try:
                self._medusa.draft(kept, hidden)
                return
            except Exception:  # drafts are optional: a failure costs speed, never a request (nor the step)
                # A lasting failure would log every step: the first with its traceback, then one in 1,000.
                self._draft_failures += 1
                if self._draft_failures % 1000 == 1:
                    log.warning("Medusa drafting failed (%d times so far); these requests go on without drafts",
                                self._draft_failures, exc_info=self._draft_failures == 1)
        for seq in kept:
            seq.medusa_drafts = []

    def _verify(self, chunk: ScheduledChunk, row: int, token: int) -> bool:
        """Whether `token`, kept at `row` of a chunk with drafts, accepts the draft at that position, so
        the next row's token is kept too; when it does not (or the request ended), the verification ends."""
        seq, drafts = chunk.seq, chunk.drafts
        if row == 0:
            seq.verify_steps += 1
            seq.draft_tokens += len(drafts)
            self.verify_steps += 1
            self.draft_tokens += len(drafts)
        if seq.finish_reason is None and row < len(drafts) and token == drafts[row]:
            seq.num_computed_tokens += 1  # the draft's KV, computed this step, is the token's
            seq.accepted_tokens += 1
            self.accepted_tokens += 1
            return True
        if seq.finish_reason is None:
            self.scheduler.trim(seq)
        return False

    def _emit(self, pending: list[tuple[Sequence, int, int]]) -> list[RequestOutput]:
        """The outputs of tokens `_advance` took: each token's text, the stop strings. It touches nothing the
        step holds (scheduler, blocks, adapters; no tensors), so it may run while a forward does: a request
        that a stop string (or its detokenizer breaking) ends goes to `_late`, which `_settle` finishes.
        A request that took several tokens in a step (speculative decoding) gets an output for each, as
        one step each would give it; a stop string in one of them drops the tokens after it."""
        outputs: list[RequestOutput] = []
        for seq, token, n in pending:
            if n > len(seq.output_token_ids):
                continue  # after a stop string that ended the request in this step's tokens: dropped
            ended = seq.status is SequenceStatus.FINISHED and n == len(seq.output_token_ids)
            if seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.ABORTED:
                continue  # aborted or failed since the token was sampled: its last output has gone out
            try:  # per request: its detokenizer breaking ends it alone
                detok = seq.detokenizer
                if detok is not None and token not in seq.stop_ids:  # a stop token is no text
                    detok.add_token(token)
                    if detok.stop_matched is not None:
                        seq.finish_reason = FinishReason.STOP_SEQUENCE  # over the length or the grammar's end
                        del seq.output_token_ids[n:]  # tokens verified after it in the same step
                        del seq.logprobs[n:]
                        if seq.status is not SequenceStatus.FINISHED:
                            self._late.append(seq)
                        ended = True
                if ended:
                    if detok is not None:
                        detok.flush()  # text held back as a possible stop-string start is final now
                    outputs.append(self._output(seq, True, n))
                elif seq.every_token or n == 1:
                    outputs.append(self._output(seq, False, n))
            except Exception as e:
                if not ended:
                    seq.finish_reason = FinishReason.ABORTED
                    self._late.append(seq)
                outputs.append(self._failed_output(seq, self._step_error(seq, e)))
        return outputs

    def _settle(self) -> None:
        """Finish the requests `_emit` ended while they may have been in a step (their outputs went out)."""
        late, self._late = self._late, []
        for seq in late:
            if seq.status is not SequenceStatus.FINISHED:
                # A stop string may have dropped tokens whose KV this step computed: they are no tokens now.
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
                self._finish(seq)
            self._seqs.pop(seq.request_id, None)

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """End `seq` alone because of `error` (its own failure): free what it holds, report the error."""
        self._seqs.pop(seq.request_id, None)
        if seq.status is not SequenceStatus.FINISHED:
            seq.finish_reason = FinishReason.ABORTED
            self._finish(seq)
        return self._failed_output(seq, self._step_error(seq, error))

    @staticmethod
    def _step_error(seq: Sequence, error: Exception) -> Exception:
        """What a client is told of `error`, its request's own failure: an adapter's or a value's error as
        it is; anything else (a bug) as an EngineStepError, with the details in the log."""
        if isinstance(error, AdapterError | ValueError):
            return error
        log.error("request %s failed alone", seq.request_id, exc_info=error)
        return EngineStepError(f"generation failed for this request ({type(error).__name__}); "
                               "other requests were not affected")

    @staticmethod
    def _failed_output(seq: Sequence, error: Exception) -> RequestOutput:
        # Built from plain fields only: the detokenizer (or whatever else broke) is not asked again.
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             token_ids=list(seq.output_token_ids), finished=True, finish_reason=seq.finish_reason,
                             seed=seq.seed, prompt=seq.prompt, error=error)

    def _finish(self, seq: Sequence) -> None:
        if seq.unread:  # tokens of queued steps: never read now, nor reported
            del seq.output_token_ids[-seq.unread:]
            seq.unread = 0
        self._readers.discard(seq)
        self.scheduler.finish(seq)
        if self.drafter is not None and seq.finish_reason is not FinishReason.ABORTED:
            self.drafter.finished(seq)
        if seq.adapter is not None and self.lora is not None:
            self.lora.drop(seq.adapter)

    @staticmethod
    def _output(seq: Sequence, finished: bool, n: int) -> RequestOutput:
        """`seq`'s output with its first `n` tokens."""
        # Positional, in RequestOutput's field order: built for every request at every step.
        detok = seq.detokenizer
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids[:n],
                             detok.text if detok is not None else "", finished,
                             seq.finish_reason if finished else None, seq.logprobs[:n] if seq.params.logprobs is not None else None,
                             seq.prompt_logprobs, seq.seed, seq.prompt, None, seq.draft_tokens, seq.accepted_tokens,
                             seq.verify_steps)


def _take(seq: Sequence, token: int, logprob: TokenLogprob | None, n: int) -> None:
    """`seq`'s new output `token`, its `n`-th, in its output already: its grammar advanced, its logprob kept, and
    `finish_reason` set if the token alone ends it (an EOS or stop token, the length, a complete grammar)."""
    if seq.grammar is not None:
        seq.grammar.advance(token)
    if logprob is not None:
        seq.logprobs.append(logprob)
    if token in seq.stop_ids:
        seq.finish_reason = FinishReason.EOS_TOKEN
    elif n >= seq.max_output:
        seq.finish_reason = FinishReason.LENGTH
    elif seq.grammar is not None and seq.grammar.done:  # the JSON is complete; only EOS could follow
        seq.finish_reason = FinishReason.EOS_TOKEN


def _base_heads(path: str, config: DecoderConfig) -> MedusaHeads:
    """The server's own Medusa heads (`speculative_medusa_heads`); ValueError naming the flag if they are bad."""
    try:
        return load_medusa(Path(path).expanduser(), config)
    except AdapterError as e:
        raise ValueError(f"speculative_medusa_heads {path}: {e}") from None


def _adapter_error(name: str, error: Exception) -> AdapterError:
    """The error a request whose adapter load raised `error` gets: an AdapterError (HTTP 424 or the like)
    whatever the load raised, naming the adapter but not the server's paths (the log has the rest)."""
    if isinstance(error, AdapterError):
        return error
    log.warning("adapter %s failed to load: %r", shown_id(name), error)
    wrapped = AdapterError(f"adapter {shown_id(name)} could not be loaded ({type(error).__name__})")
    wrapped.__cause__ = error
    return wrapped
