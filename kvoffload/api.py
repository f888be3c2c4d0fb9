"""The Python API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvoffload.attention import make_backend
from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.device import resolve_device, set_threads
from kvoffload.engine.engine import Engine
from kvoffload.engine.sequence import Sequence
from kvoffload.model.loading import load_model

Prompt = str | list[int]


@dataclass(frozen=True)
class RequestMetrics:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float        # forward time spent on this prompt
    decode_s: float         # first token -> finish
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
        self.model, self.tokenizer, self.load_stats = load_model(config, self.device)
        self.model_config = self.model.cfg
        self.dtype, self.quantization = self.load_stats.dtype, self.load_stats.quantization
        self.engine = Engine(self.model, make_backend(self.model_config, config, self.device, self.dtype),
                             self.tokenizer, config, self.device)

    def kv_report(self) -> str | None:
        """A line on speculation (if on), then the KV manager's lines (a sparse policy's reads,
        the tiers' traffic and memory); None when there is none of them."""
        lines = []
        spec = self.engine.spec
        if spec is not None and spec.stats.rounds:
            lines.append(f"{spec.stats.line()}; draft caches peaked at {spec.draft.peak_bytes / 2**20:.1f} MiB")
        lines += self.engine.kv.report()
        return "\n".join(lines) or None

    def close(self) -> None:
        """Release the KV store's workers and files now (otherwise done at exit)."""
        self.engine.kv.close()

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_bos=False)
        return self.tokenizer.encode(prompt)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, chat: bool = False, use_tqdm: bool = False) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        param_list = self._params_for(params, len(prompt_list))
        ids = [self.encode(p, chat) for p in prompt_list]      # validate all before starting any
        seq_ids = [self.engine.add_request(i, p) for i, p in zip(ids, param_list)]
        bar = _progress(sum(p.max_tokens for p in param_list)) if use_tqdm else None
        while self.engine.has_unfinished():
            outs = self.engine.step()
            if bar is not None:
                bar.update(len(outs))
        if bar is not None:
            bar.close()
        return [self._output(self.engine.pop_finished(s), p if isinstance(p, str) else None)
                for s, p in zip(seq_ids, prompt_list)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False) -> Iterator[str]:
        """Yields text as it is generated; ``self.last_output`` holds the result afterwards."""
        sid = self.engine.add_request(self.encode(prompt, chat), params or SamplingParams())
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.seq_id == sid and out.text_delta:
                    yield out.text_delta
        self.last_output = self._output(self.engine.pop_finished(sid), prompt if isinstance(prompt, str) else None)

    @staticmethod
    def _params_for(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
        return params

    @staticmethod
    def _output(seq: Sequence, prompt: str | None) -> RequestOutput:
        m = RequestMetrics(seq.prompt_len, len(seq.output_ids), seq.times.prefill_s, seq.times.decode_s)
        return RequestOutput(prompt, seq.prompt_ids, seq.text, seq.output_ids, seq.finish_reason or "", m)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="generating")
