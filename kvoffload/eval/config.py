"""What ``kvoffload eval`` runs: :class:`EvalConfig` and the parsers of its CLI strings.

Kept free of torch so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvoffload.config import cli_field
from kvoffload.errors import ConfigError, InputError
from kvoffload.eval.tasks import TASKS, get_task


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate (the engine's settings are an :class:`EngineConfig` beside it).

    tasks: task names (see :data:`kvoffload.eval.tasks.TASKS`).
    lengths: target lengths in the model's own tokens; a generation task's prompt is at most
        ``length - tokens_to_generate`` tokens (RULER's convention), ``ppl``/``agreement`` score
        passages of exactly ``length`` tokens. At most the model's context.
    samples: samples per (task, length).
    seed: base seed; each sample's text is drawn from (seed, task, length, index) alone.
    depth: needle depth in [0, 1] for the needle tasks (``None``: drawn per needle, as RULER).
    no_chat: feed prompts as plain text instead of the model's chat template (default: chat,
        since the models we ship are instruct models; the answer prefix opens the assistant turn).
    label: name of this engine configuration in the report (default: its non-default engine
        flags, e.g. ``dtype=float32``, or ``dense`` when there are none).
    output: directory for ``samples.jsonl`` (the resume log), ``results.json``, ``results.md``
        and ``results.png``; ``None`` = print the table only (no resume).
    decode_tokens: ``agreement``: the last this-many tokens of each passage are fed one at a time
        as decode steps (the rest is prefilled), and scored against the reference.
    reference: ``agreement``: ``FIELD=VALUE`` engine settings of the reference run (default: the
        run's model and numerics with dense attention; see ``REFERENCE_KEEPS``).
    """

    tasks: tuple[str, ...]
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    samples: int = cli_field(5, "samples per task and length")
    seed: int = cli_field(0, "base seed of the generated samples")
    depth: float | None = cli_field(None, "needle depth in [0, 1] (default: drawn per needle from RULER's 40 depths)")
    no_chat: bool = cli_field(False, "plain-text prompts instead of the model's chat template")
    label: str | None = cli_field(None, "configuration name in the report (default: the non-default engine flags, or 'dense')")
    output: str | None = cli_field(None, "directory for samples.jsonl (resume log), results.json/.md/.png", short="-o")
    decode_tokens: int = cli_field(128, "agreement: tokens fed one by one as decode steps at the end of each passage")
    reference: tuple[str, ...] = cli_field((), "agreement: FIELD=VALUE setting of the reference engine (repeatable; default: dense, same numerics)")

    def __post_init__(self) -> None:
        for t in self.tasks:
            get_task(t)
        if not self.tasks:
            raise InputError("no task given")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise InputError(f"lengths must be >= 2 tokens, got {self.lengths}")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.depth is not None and not (0.0 <= self.depth <= 1.0):
            raise ConfigError(f"depth must be in [0, 1], got {self.depth}")
        if self.decode_tokens < 1:
            raise ConfigError(f"decode_tokens must be >= 1, got {self.decode_tokens}")
        if self.label is not None and not re.fullmatch(r"[\w.,=+:-]+", self.label):
            raise ConfigError(f"label {self.label!r}: use letters, digits and . , = + : - _")


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``passkey,vt`` or ``all``."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return tuple(TASKS)
    for n in names:
        get_task(n)
    return tuple(dict.fromkeys(names))


def parse_lengths(spec: str) -> tuple[int, ...]:
    """``1k,2k,4096`` -> ``(1024, 2048, 4096)`` (``k`` = 1024)."""
    out = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m:
            raise InputError(f"bad length {part!r} in {spec!r} (integers, optionally with k = 1024, e.g. 1k,2k,4096)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise InputError(f"no lengths in {spec!r}")
    return tuple(dict.fromkeys(out))
