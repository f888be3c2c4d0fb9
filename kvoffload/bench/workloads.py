"""What a benchmark run measures (llama-bench style): ``ppN`` and ``tgN@dD``, each at batch B."""

from __future__ import annotations

from dataclasses import dataclass

from kvoffload.errors import ConfigError


@dataclass(frozen=True)
class BenchTest:
    """One measured quantity.

    kind: ``pp`` (prefill N tokens per sequence from an empty cache) or ``tg`` (decode N
        tokens per sequence after a prompt of ``depth`` tokens, which is not timed).
    n: tokens prefilled (pp) or generated (tg) per sequence.
    depth: context already in the cache when a tg test starts (0 for pp).
    batch: sequences run together.
    """

    kind: str
    n: int
    depth: int = 0
    batch: int = 1

    @property
    def name(self) -> str:
        s = f"pp{self.n}" if self.kind == "pp" else f"tg{self.n} @ d{self.depth}"
        return s if self.batch == 1 else f"{s} ×{self.batch}"

    @property
    def context(self) -> int:
        """Tokens in the cache at the end of the test (the plot's x axis)."""
        return self.n if self.kind == "pp" else self.depth + self.n


@dataclass(frozen=True)
class Sample:
    """One repetition of one test on one engine.

    tok_s: tokens/s (pp: prompt tokens over the time prefilling them; tg: generated tokens
        over the time generating them).
    ttft_s: pp tests only: seconds from a prompt's submission to its first token (the prefill
        plus sampling the first token; the mean over the batch's sequences), else None.
    """

    tok_s: float
    ttft_s: float | None = None


def parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise ConfigError(f"{what}: expected non-negative integers, got {text!r}")
    return vals


def make_tests(n_prompt: list[int], n_gen: list[int], depths: list[int], batches: list[int]) -> list[BenchTest]:
    tests = [BenchTest("pp", n, 0, b) for b in batches for n in n_prompt if n > 0]
    tests += [BenchTest("tg", n, d, b) for b in batches for d in depths for n in n_gen if n > 1]
    if not tests:
        raise ConfigError("nothing to measure: give --n-prompt > 0 or --n-gen > 1")
    if any(b < 1 for b in batches):
        raise ConfigError("batch sizes must be >= 1")
    return tests
