"""`Engine.step()` = schedule -> prepare inputs -> forward -> sample -> update -> emit.

The engine is synchronous and single-threaded on purpose: every mutation of scheduler, KV cache
and sequence state happens inside `step()` or in `add_request`/`abort` called between steps by the
one thread that owns it (`AsyncEngine` runs that thread). Adapter loads are the exception and live
on the adapter cache's loader thread, which only touches slots no running request uses.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from loragate.engine import host
from loragate.engine.adapters.cache import AdapterCache
from loragate.engine.adapters.peft_loader import BaseModelInfo
from loragate.engine.adapters.registry import AdapterRegistry
from loragate.engine.adapters.sources import source_settings
from loragate.engine.adapters.slots import plan_for_engine, slot_modules
from loragate.engine.config import EngineConfig
from loragate.engine.cpu_alloc import tune_malloc
from loragate.engine.detokenizer import TextStream
from loragate.engine.errors import AdapterNotFoundError, PromptTooLongError
from loragate.engine.fairness import make_policy
from loragate.engine.inputs import build_forward_batch
from loragate.engine.kernel_check import check_kernels, warm_for_engine
from loragate.engine.kv_cache import KVCache, KVCacheSpec, kv_budget_bytes
from loragate.engine.memory import available_bytes
from loragate.engine.model.config import ModelConfig
from loragate.engine.model.llama import LlamaModel
from loragate.engine.model.loader import checkpoint_dtype, fused_weights, read_tensors
from loragate.engine.model.lora import LoraWeights
from loragate.engine.outputs import EngineRequest, EngineStats, LoraState, RequestOutput, TokenLogprob
from loragate.engine import prompt_logprobs
from loragate.engine.sampler import Sampler, SampleRow, make_generator
from loragate.engine.scheduler import Scheduler
from loragate.engine.sequence import Sequence, SeqState
from loragate.engine.structured.backend import llguidance_backend
from loragate.engine.structured.runtime import StructuredRuntime
from loragate.engine.tokenizer import Tokenizer
from loragate.kernels import native

log = logging.getLogger("loragate.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


class Engine:
    """Owns the model, KV cache, adapters, scheduler and sampler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = Path(config.model)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            tune_malloc()
            native.load_all()  # build (or find) the native CPU kernels now, not in the first step
        self.model_config = ModelConfig.from_dir(path)
        mc = self.model_config
        self.dtype_choice = host.choose_dtype(config.dtype, checkpoint_dtype(mc), self.device.type,
                                              host.detect().features)
        self.dtype = self.dtype_choice.dtype
        # before the weights load: a host that cannot run the kernels fails in seconds, not minutes
        self.kernels = check_kernels(self.device, self.dtype, config.lora_kernels) \
            if config.enable_lora or self.device.type == "cpu" else None
        self.host_info = host.summary(self.dtype_choice, self.device.type)  # for /health
        log.info("%s", host.summary_line(self.host_info))
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        weights = fused_weights(mc, read_tensors(path), self.device, self.dtype)
        self.model = LlamaModel(mc, weights, self.device, self.dtype, max_positions=max(self.max_model_len, mc.max_position_embeddings))
        self.tokenizer = Tokenizer.from_pretrained(path)
        # the tokenizer's set already includes generation_config.json's eos_token_id
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(mc.eos_token_ids)
        free = available_bytes(self.device)  # after the weights: what adapter slots and KV cache share
        self.lora: LoraWeights | None = None
        self.adapters: AdapterCache | None = None
        self.slot_plan = None
        self.registry = AdapterRegistry(config.adapters, config.adapter_dir, config.allowed_adapter_dirs)
        self.sources = source_settings(config)
        if config.enable_lora:
            self.slot_plan, startup = plan_for_engine(config, self.model.lora_specs, mc.num_layers, self.dtype,
                                                      self.registry, free)
            log.info("LoRA: %s", self.slot_plan.describe())
            self.lora = LoraWeights(self.model.lora_specs, mc.num_layers, self.slot_plan.max_loras,
                                    config.max_lora_rank, self.device, self.dtype, groups=self.slot_plan.groups)
            self.model.attach_lora(self.lora)
            shapes = {}
            for spec_ in self.model.lora_specs.values():
                for name, out in zip(spec_.slice_names, spec_.slice_out):
                    shapes[name] = (spec_.in_dim, out)
            self.base_info = BaseModelInfo(mc.model_type, mc.num_layers, shapes, self.dtype,
                                           slot_modules=slot_modules(self.slot_plan))
            self.adapters = AdapterCache(self.registry, self.lora, self.base_info, config.max_cpu_adapter_memory,
                                         config.max_lora_rank, pinned=config.pin_adapters)
            warm_for_engine(self.kernels, self.lora, startup.ranks)
        spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size, self.dtype)
        budget = kv_budget_bytes(config.kv_cache_memory, self.device, config.gpu_memory_fraction,
                                 config.cpu_kv_cache_memory, free=free,
                                 reserved=self.slot_plan.total_bytes if self.slot_plan else 0)
        self.kv = KVCache(spec, spec.blocks_for_budget(budget), self.device, config.enable_prefix_caching)
        if self.kernels is not None:
            log.info(self.kernels.summary())
        self.policy = make_policy(config.fairness, dict(config.tenant_weights) or None)
        self.scheduler = Scheduler(config, self.kv, self.policy, self.adapters)
        self.sampler = Sampler(mc.vocab_size, seed=config.seed)
        # grammars compile on the runtime's own threads (the llguidance vocabulary is built there too)
        self.structured = StructuredRuntime(
            lambda: llguidance_backend(self.tokenizer, mc.vocab_size, sorted(self.eos_ids)))
        self.seqs: dict[str, Sequence] = {}
        self.num_steps = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.adapters is not None:
            self.adapters.start()
            for name in self.config.pin_adapters:  # pinned at construction; load them now
                self.adapters.request(name)

    def shutdown(self) -> None:
        if self.adapters is not None:
            self.adapters.shutdown()
        self.structured.shutdown()

    # ---- requests --------------------------------------------------------------------------
    def check_request(self, req: EngineRequest) -> None:
        """Validate before queueing; raises the error the gateway turns into 400/404."""
        req.params.validate()
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n + req.params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + req.params.max_tokens} tokens ({n} in the messages, {req.params.max_tokens} in the completion)."
            )
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.adapter:
            if self.adapters is None or not self.registry.exists(req.adapter):
                raise AdapterNotFoundError(f"adapter {req.adapter!r} not found")

    def add_request(self, req: EngineRequest) -> None:
        self.check_request(req)
        if req.request_id in self.seqs:
            raise ValueError(f"duplicate request id {req.request_id}")
        text = TextStream(self.tokenizer, stop=list(req.params.stop),
                          include_stop_str_in_output=req.params.include_stop_str_in_output,
                          prefix_ids=req.prompt_token_ids[-8:])
        gen = make_generator(req.params.seed, self.device) if req.params.seed is not None else None
        client = req.tenant or req.adapter or "base"
        seq = Sequence(request=req, client=client, text=text, generator=gen)
        if req.params.structured is not None:
            seq.grammar = self.structured.attach(req.params.structured)  # compiles off the loop
        if req.params.prompt_logprobs is not None:
            seq.prompt_lp = prompt_logprobs.PromptLogprobState(req.params.prompt_logprobs)
        self.seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Free the request's blocks and slot at once. Returns its final output, if it existed."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return self._final(seq, "abort", "", [])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self, alive: bool = True) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv.allocator.num_used,
            kv_blocks_total=self.kv.allocator.num_blocks,
            steps=self.num_steps,
            alive=alive,
            preemptions=self.scheduler.num_preemptions,
            lora_slots=self.lora.max_loras if self.lora is not None else 0,
            prefix_cache_queries=self.kv.allocator.queries,
            prefix_cache_hits=self.kv.allocator.hits,
            prefix_cache_blocks=self.kv.allocator.num_cached,
        )

    def lora_state(self) -> LoraState:
        """Resident adapters, adapters queued requests wait for, and the device slot count (read
        from the slot buffers, not the flag). Call between steps, on the thread that steps."""
        if self.adapters is None or self.lora is None:
            return LoraState((), (), 0)
        resident = sorted(a.name for a in self.adapters.stats() if a.tier == "device")
        wanted = {seq.request.adapter for queue in self.scheduler.queues.values() for seq in queue
                  if seq.request.adapter}
        return LoraState(tuple(resident), tuple(sorted(wanted.difference(resident))), self.lora.max_loras)

    def adapter_in_use(self, name: str) -> bool:
        return any(s.request.adapter == name for s in self.seqs.values())

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        for seq, err in sched.failed:
            self.seqs.pop(seq.request_id, None)
            outputs.append(self._final(seq, "error", "", [], error=err, error_kind="adapter_load"))
        if not sched.scheduled:
            return outputs
        self.num_steps += 1
        batch = build_forward_batch(sched.scheduled, self.kv.block_size, self.device, self.lora)
        lp_rows, lp_spans = prompt_logprobs.plan(sched.scheduled)  # empty unless a request asks
        if lp_rows:
            batch.logits_rows = torch.cat([batch.logits_rows, torch.tensor(lp_rows, device=self.device)])
        logits = self.model.forward(batch, self.kv.layers)
        sampled = [s.seq for s in sched.scheduled if s.sample]
        if lp_spans:  # the extra rows follow the sampled ones
            prompt_logprobs.gather(logits[len(sampled):], lp_spans)
            logits = logits[: len(sampled)]
        for s in sched.scheduled:
            s.seq.num_computed += s.num_tokens
            self.kv.allocator.commit(s.seq)  # full computed blocks become shareable
        if not sampled:
            return outputs
        rows = [SampleRow(q.request.params, q.prompt_ids, q.output_ids, q.generator) for q in sampled]
        result = self.sampler(logits, rows, self.structured.bitmask(sampled))
        now = time.monotonic()
        for seq, tok, lp in zip(sampled, result.token_ids, result.logprobs):
            outputs.append(self._append(seq, tok, lp, now))
        return outputs

    def _append(self, seq: Sequence, tok: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        params = seq.request.params
        if seq.grammar is not None and not seq.grammar.accept(tok):
            return self._finish_refused(seq)
        seq.output_ids.append(tok)
        self.policy.charge(seq.client, output_tokens=1)
        if seq.first_token_at is None:
            seq.first_token_at = now
        is_eos = tok in self.eos_ids and not params.ignore_eos
        delta, stopped = ("", False) if is_eos else seq.text.push(tok)
        reason = None
        complete = seq.grammar is not None and seq.grammar.terminated  # the grammar allows nothing more
        if stopped or is_eos or complete or tok in params.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        lps = [lp] if lp is not None else None
        if reason is None:
            return RequestOutput(seq.request_id, [tok], delta, new_logprobs=lps,
                                 prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                                 queue_time=seq.waited, first_token_time=seq.first_token_at,
                                 cached_tokens=seq.num_cached_tokens,
                                 prompt_logprobs=prompt_logprobs.take(seq))
        if not stopped:
            delta += seq.text.finish()
        self.seqs.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        return self._final(seq, reason, delta, [tok], lps)

    def _finish_refused(self, seq: Sequence) -> RequestOutput:
        """The grammar allowed no token of the vocabulary at all (every logit was masked): end
        with the valid output so far rather than emit a token outside the grammar."""
        delta = seq.text.finish()
        self.seqs.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        return self._final(seq, "stop", delta, [])

    def _final(self, seq: Sequence, reason: str, delta: str, toks: list[int],
               lps: list[TokenLogprob] | None = None, error: str | None = None,
               error_kind: str | None = None) -> RequestOutput:
        seq.state = SeqState.FINISHED
        seq.finish_reason = reason
        return RequestOutput(seq.request_id, toks, delta, finished=True, finish_reason=reason, new_logprobs=lps,
                             prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                             error=error, queue_time=seq.waited, first_token_time=seq.first_token_at,
                             error_kind=error_kind, cached_tokens=seq.num_cached_tokens,
                             grammar_complete=seq.grammar is not None and seq.grammar.terminated,
                             prompt_logprobs=prompt_logprobs.take(seq))
