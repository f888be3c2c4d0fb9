"""The Python API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvoffload.attention import make_backend
from kvoffload.attention.backend import tier_line
from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.device import resolve_device, resolve_dtype, set_threads
from kvoffload.engine.engine import Engine
from kvoffload.engine.sequence import Sequence, TokenLogprob
from kvoffload.errors import ConfigError, ConfigTypeError, InputError, KvoffloadError
from kvoffload.kv.persist.prefix import PrefixStore
from kvoffload.model.loading import load_model
from kvoffload.preflight import preflight

Prompt = str | list[int]


@dataclass(frozen=True)
class RequestMetrics:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float        # forward time spent on this prompt
    decode_s: float         # first token -> finish
    ttft_s: float = 0.0     # arrival -> first token (a stored prefix loaded, the rest prefilled, the first token)
    reused_tokens: int = 0  # prompt tokens whose KV came from the persistent store (not prefilled)
    shared_tokens: int = 0  # prompt tokens whose KV was shared from a live sequence (prefix sharing; not prefilled)
    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second of decode (the first comes from prefill)."""
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s else 0.0


@dataclass(frozen=True)
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None                 # SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None   # SamplingParams.prompt_logprobs


class LLM:
    """Load a model once; generate for many prompts (batched, ragged)."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **overrides) -> None:
        names = EngineConfig.field_names()
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        config = (config or EngineConfig()).replace(**overrides)
        if model is not None:
            config = config.replace(model=model)
        self.config = config
        set_threads(config.threads)
        self.device = resolve_device(config.device)
        preflight(config, self.device.type, resolve_dtype(config.dtype, self.device))   # before the slow load
        self.model, self.tokenizer, self.load_stats = load_model(config, self.device)
        self.model_config = self.model.cfg
        self.dtype, self.quantization = self.load_stats.dtype, self.load_stats.quantization
        kv = make_backend(self.model_config, config, self.device, self.dtype)
        self.engine = Engine(self.model, kv, self.tokenizer, config, self.device, self._prefix_store(kv))
        self.closed = False

    def _prefix_store(self, kv) -> PrefixStore | None:
        """The persistent KV store of ``--kv-store`` as this model's prefix cache (None: none)."""
        st = self.config.store
        if not st.enabled:
            return None
        from kvoffload.kv.persist.store import BlockDir
        from kvoffload.model.fingerprint import weights_fingerprint

        # what the KV depends on besides the layout: the weights, how they are computed with, and where
        fingerprint = (f"weights={weights_fingerprint(self.load_stats.source)};dtype={self.dtype};"
                       f"quantization={self.quantization};formats={self.load_stats.weight_formats};"
                       f"device={self.device.type}")
        return PrefixStore(BlockDir(st.kv_store, st.kv_store_budget, st.kv_store_fsync), fingerprint, kv.layout,
                           self.model_config.num_layers, source=self.load_stats.source)

    def kv_report(self) -> str | None:
        """A line on speculation (if on), then the KV manager's lines (a sparse policy's reads,
        the tiers' traffic and memory); None when there is none of them."""
        lines = []
        spec = self.engine.spec
        if spec is not None and spec.stats.rounds:
            lines.append(f"{spec.stats.line()}; draft caches peaked at {spec.draft.peak_bytes / 2**20:.1f} MiB")
        kv_lines = self.engine.kv.report()
        stats = self.engine.kv.stats()
        if stats.tiers and kv_lines and kv_lines[-1] == tier_line(stats):
            # the tiered store's traffic line, with the prefill's reported apart from the decode's
            kv_lines[-1:] = tier_line(stats, self.engine.prefill_kv, self.engine.prefill_tokens).split("\n")
        lines += kv_lines
        if self.engine.shared_tokens:
            lines.append(f"prefix sharing: {self.engine.shared_tokens} prompt tokens shared with live sequences "
                         f"(not prefilled); {self.engine.prefill_tokens} prefilled")
        if self.engine.prefix is not None:
            lines.append(self.engine.prefix.report())
        return "\n".join(lines) or None

    def close(self) -> None:
        """Release the KV store's workers and files now (otherwise done at exit), after the
        persistent store's queued writes. The LLM cannot generate afterwards."""
        self.closed = True
        if self.engine.prefix is not None:
            self.engine.prefix.flush()
        self.engine.kv.close()

    def _check_open(self) -> None:
        if self.closed:
            raise KvoffloadError("this LLM was closed (LLM.close()); create a new one to generate")

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                raise ConfigTypeError("prompt must be a string or a list of int token ids")
            return [int(t) for t in prompt]                   # numpy integers too
        if not isinstance(prompt, str):
            raise ConfigTypeError(f"prompt must be a string or a list of int token ids, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"the prompt is not valid UTF-8 text (at character {e.start})") from None
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_bos=False)
        return self.tokenizer.encode(prompt)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, chat: bool = False, use_tqdm: bool = False) -> list[RequestOutput]:
        self._check_open()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if not single and not isinstance(prompts, (list, tuple)):
            raise ConfigTypeError(f"prompts must be a string, a list of token ids or a list of those, "
                                  f"got {type(prompts).__name__}")
        prompt_list = [prompts] if single else list(prompts)
        param_list = self._params_for(params, len(prompt_list))
        ids = [self.encode(p, chat) for p in prompt_list]      # validate all before starting any
        seq_ids: list[int] = []
        try:
            for i, p in zip(ids, param_list):
                seq_ids.append(self.engine.add_request(i, p))
            bar = _progress(sum(p.max_tokens for p in param_list)) if use_tqdm else None
            while self.engine.has_unfinished():
                outs = self.engine.step()
                if bar is not None:
                    bar.update(len(outs))
            if bar is not None:
                bar.close()
            return [self._output(self.engine.pop_finished(s), p if isinstance(p, str) else None)
                    for s, p in zip(seq_ids, prompt_list)]
        except BaseException:
            self.engine.abort(seq_ids)      # nothing of this call stays queued or allocated
            raise

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False) -> Iterator[str]:
        """Yields text as it is generated; ``self.last_output`` holds the result afterwards."""
        self._check_open()
        params = self._params_for(params, 1)[0]
        sid = self.engine.add_request(self.encode(prompt, chat), params)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.seq_id == sid and out.text_delta:
                        yield out.text_delta
            self.last_output = self._output(self.engine.pop_finished(sid), prompt if isinstance(prompt, str) else None)
        except BaseException:               # an error, or the caller closed the generator early
            self.engine.abort([sid])
            raise

    @staticmethod
    def _params_for(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise ConfigTypeError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}"
                                  + (" (use SamplingParams(**d))" if isinstance(params, dict) else ""))
        params = list(params)
        if len(params) != n:
            raise ConfigError(f"{len(params)} SamplingParams for {n} prompts")
        return params

    @staticmethod
    def _output(seq: Sequence, prompt: str | None) -> RequestOutput:
        t = seq.times
        m = RequestMetrics(seq.prompt_len, len(seq.output_ids), t.prefill_s, t.decode_s,
                           (t.first_token - t.arrival) if t.first_token is not None else 0.0, seq.reused_tokens,
                           seq.shared_tokens)
        return RequestOutput(prompt, seq.prompt_ids, seq.text, seq.output_ids, seq.finish_reason or "", m,
                             seq.logprobs if seq.params.logprobs is not None else None,
                             seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="generating")
