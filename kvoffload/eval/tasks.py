"""Seeded task generators at a target length in the model's own tokens, and RULER's scoring.

Each generation task is one small function ``draft(rng, units, depth) -> Draft`` that writes the
user message for ``units`` haystack units (sentences, clauses or list words); :func:`make_sample`
finds, by binary search, the most units whose rendered prompt fits the token budget, so a sample
lands within about one unit of it. Definitions follow RULER (Hsieh et al., 2024):

* ``passkey`` — the classic pass-key test on RULER's noise haystack (RULER's ``niah_single_1`` is
  its needle-sentence variant).
* ``niah_single`` / ``niah_multikey`` / ``niah_multivalue`` — RULER's ``niah_single_2``,
  ``niah_multikey_1`` and ``niah_multivalue``: needles "One of the special magic numbers for
  {key} is: {value}." (keys adjective-noun words, values 7-digit numbers) in natural text (the
  KJV here, Paul Graham's essays in RULER), inserted between sentences; multi-key has 4 keys of
  which one is asked; multi-value has 4 values for the one key, all asked.
* ``vt`` — variable tracking: one chain of 4 hops (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR
  ABCDE`` ...) in the noise haystack, after one worked example; all 5 names are the answer.
* ``cwe`` — common-words extraction: a numbered word list where 10 words appear 30 times and the
  others 3 times (6 and 1 below 4K tokens), after one worked example; the 10 are the answer.

Length: RULER's ``max_seq_length`` counts the tokens to generate, so a sample of length ``L``
has a prompt (chat template and answer prefix included) of at most ``L - tokens_to_generate``
tokens, and ``L`` may equal the model's context (8K on SmolLM2: a prompt of at most
8192 - 128 tokens for a needle task).

Depth: ``depth`` in [0, 1] puts the (first) asked needle at the unit boundary nearest to that
fraction of the haystack's characters (RULER counts sentences instead; characters track token
positions more closely); ``None`` draws each needle's depth from RULER's 40 evenly spaced depths. Other needles
(multi-key distractors, further values) always take drawn depths. ``Sample.depths`` records
where each needle really landed (fraction of the haystack's characters before it).

Scoring (RULER's ``string_match_all`` / ``string_match_part``, ×100): the output, stripped and
with control characters turned into newlines, scores the fraction (all) or any (part) of the
reference strings it contains, case-insensitively.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from kvoffload.errors import InputError
from kvoffload.eval import corpora

DEPTHS = tuple(round(i * 100 / 39) / 100 for i in range(40))     # RULER: np.linspace(0, 100, 40), rounded
NEEDLE = "One of the special magic numbers for {key} is: {value}."


@dataclass(frozen=True)
class Draft:
    """One sample's text before it is rendered into tokens."""

    input: str                      # the user message
    answer_prefix: str              # how the answer starts (the assistant turn begins with it)
    answers: tuple[str, ...]        # reference strings the output is scored against
    needles: tuple[str, ...] = ()   # needle strings placed in the haystack (asked ones first)
    context: str = ""               # the haystack with the needles, as it appears in ``input``


@dataclass(frozen=True)
class Sample:
    """One generated sample, rendered for a tokenizer.

    task, length, index, seed: what was asked for (``length`` counts the tokens to generate).
    prompt_ids: the model's input (chat template and answer prefix included).
    answers: the references; units: haystack units used; depths: where each needle landed, as the
    fraction of the haystack's characters before it (asked needles first).
    """

    task: str
    length: int
    index: int
    seed: int
    prompt_ids: list[int] = field(repr=False)
    input: str = field(repr=False)
    answer_prefix: str = ""
    answers: tuple[str, ...] = ()
    units: int = 0
    depths: tuple[float, ...] = ()


# --------------------------------------------------------------------------- scoring

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's clean-up of a model output."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def string_match_all(pred: str, refs: tuple[str, ...] | list[str]) -> float:
    """100 × the fraction of references found in the output (case-insensitive)."""
    p = postprocess(pred).lower()
    return 100.0 * sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: tuple[str, ...] | list[str]) -> float:
    """100 if any reference is found in the output (case-insensitive), else 0."""
    p = postprocess(pred).lower()
    return 100.0 * max(r.lower() in p for r in refs)


SCORERS: dict[str, Callable[[str, tuple[str, ...]], float]] = {"all": string_match_all, "part": string_match_part}


# --------------------------------------------------------------------------- haystacks

def _join(units: list[str]) -> str:
    """Units joined by spaces; a line break after each full noise cycle (RULER's line layout)."""
    out = []
    for i, u in enumerate(units):
        out.append(u)
        if i + 1 < len(units):
            out.append("\n" if u == corpora.NOISE_SENTENCES[-1] else " ")
    return "".join(out)


def noise_units(n: int) -> list[str]:
    """``n`` sentences of RULER's noise, cycling."""
    s = corpora.NOISE_SENTENCES
    return [s[i % len(s)] for i in range(n)]


_CLAUSE_END = (".", ";", ":", "?", "!")


def kjv_units(rng: random.Random, n_words: int) -> list[str]:
    """``n_words`` KJV words from a verse drawn by ``rng``, grouped into clauses (ending in . ; : ? !)."""
    words, starts = corpora.kjv_words_cached(), corpora.kjv_verse_starts()
    start = starts[rng.randrange(len(starts))]
    take = [words[(start + i) % len(words)] for i in range(n_words)]
    units, cur = [], []
    for w in take:
        cur.append(w)
        if w.endswith(_CLAUSE_END):
            units.append(" ".join(cur))
            cur = []
    if cur:                                           # a clause cut short ends with a full stop
        units.append(" ".join(cur).rstrip(",") + ".")
    return units


def insert_needles(rng: random.Random, units: list[str], needles: list[str], depth: float | None) -> list[str]:
    """Needles between units: the first at ``depth`` (or a drawn RULER depth), the rest at drawn depths.

    A depth is a fraction of the haystack's characters (so, nearly, of its tokens): each needle goes
    to the unit boundary nearest to it.
    """
    drawn = rng.sample(DEPTHS, len(needles))
    depths = ([depth] + drawn[1:]) if depth is not None else drawn
    bounds, total = [0], 0                           # character offset of each unit boundary
    for u in units:
        total += len(u) + 1
        bounds.append(total)
    slots = [min(range(len(bounds)), key=lambda i, t=d * total: abs(bounds[i] - t)) for d in depths]
    out = list(units)
    for slot, needle in sorted(zip(slots, needles), key=lambda x: -x[0]):
        out.insert(slot, needle)
    return out


# --------------------------------------------------------------------------- random values

def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct adjective-noun keys (RULER's needle keys)."""
    lists, keys = corpora.word_lists(), []
    while len(keys) < n:
        k = f"{rng.choice(lists['adjectives'])}-{rng.choice(lists['nouns'])}"
        if k not in keys:
            keys.append(k)
    return keys


# --------------------------------------------------------------------------- tasks

PASSKEY_TEMPLATE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.\n\n{context}\n\nWhat is the pass key?")


def draft_passkey(rng: random.Random, units: int, depth: float | None) -> Draft:
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context = _join(insert_needles(rng, noise_units(units), [needle], depth))
    return Draft(PASSKEY_TEMPLATE.format(context=context), "The pass key is", (key,), (needle,), context)


NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What are all the special magic {kind} for {query} mentioned in the provided text?")
NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"


def _niah(rng: random.Random, units: int, depth: float | None, num_keys: int, num_values: int) -> Draft:
    """RULER's niah: ``num_keys`` keys with ``num_values`` values each; the first key is asked."""
    text_rng = random.Random(rng.random())          # the haystack's draw does not shift the needles'
    keys = _keys(rng, num_keys)
    values = [[_number(rng, 7) for _ in range(num_values)] for _ in keys]
    rng.shuffle(values[0])                           # the asked values, in the order of their depths
    asked = [NEEDLE.format(key=keys[0], value=v) for v in values[0]]
    others = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys[1:], values[1:]) for v in vs]
    rng.shuffle(others)
    needles = asked + others
    context = _join(insert_needles(rng, kjv_units(text_rng, units), needles, depth))
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if num_values == 1:                              # RULER's singular wording for one asked value
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace(" are", " is")
    kind = "numbers" if num_values > 1 else "number"
    return Draft(template.format(kind=kind, context=context, query=keys[0]),
                 prefix.format(kind=kind, query=keys[0]), tuple(values[0]), tuple(needles), context)


def draft_niah_single(rng: random.Random, units: int, depth: float | None) -> Draft:
    return _niah(rng, units, depth, 1, 1)


def draft_niah_multikey(rng: random.Random, units: int, depth: float | None) -> Draft:
    return _niah(rng, units, depth, 4, 1)


def draft_niah_multivalue(rng: random.Random, units: int, depth: float | None) -> Draft:
    return _niah(rng, units, depth, 1, 4)


VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {query}, they are:")


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if v not in names:
            names.append(v)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, chain, value


def _vt_text(rng: random.Random, units: int, chain: list[str]) -> str:
    sents = noise_units(units)
    slots = sorted(rng.sample(range(len(sents) + 1), len(chain)))
    for j, (slot, assignment) in enumerate(zip(slots, chain)):    # in order: each lands after the last
        sents.insert(slot + j, assignment + ".")
    return _join(sents)


def draft_vt(rng: random.Random, units: int, depth: float | None, hops: int = 4) -> Draft:
    ex_names, ex_chain, ex_value = _vt_chain(rng, hops, 5)
    example = (VT_TEMPLATE.format(context=_vt_text(rng, 40, ex_chain), query=ex_value) + " "
               + VT_PREFIX.format(n=hops + 1, query=ex_value) + " " + " ".join(ex_names))
    names, chain, value = _vt_chain(rng, hops, 5)
    context = _vt_text(rng, max(units, hops + 1), chain)
    return Draft(example + "\n\n" + VT_TEMPLATE.format(context=context, query=value),
                 VT_PREFIX.format(n=hops + 1, query=value), tuple(names), tuple(c + "." for c in chain), context)


CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"


def _cwe_list(rng: random.Random, vocab: list[str], common: int, freq_cw: int, freq_ucw: int) -> str:
    words = vocab[:common] * freq_cw + vocab[common:] * freq_ucw
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def draft_cwe(rng: random.Random, units: int, depth: float | None, long: bool = False) -> Draft:
    """``units`` distinct words; ``long`` (L >= 4K) switches RULER's frequencies from (6, 1) to (30, 3)."""
    vocab = list(corpora.common_words_vocab())
    rng.shuffle(vocab)                               # one permutation: the first words stay as units grows
    freq = (30, 3) if long else (6, 1)
    ex_freq = (10, 3) if long else (3, 1)
    ex_words = vocab[-(40 if long else 20):]         # the example's words never meet the sample's
    ex_list = _cwe_list(rng, ex_words, 10, *ex_freq)
    example = (CWE_TEMPLATE.format(context=ex_list) + " " + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_words[:10])))
    words = vocab[:max(units, 11)]
    context = _cwe_list(rng, words, 10, *freq)
    return Draft(example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, tuple(words[:10]), (), context)


@dataclass(frozen=True)
class Task:
    """A registered task.

    name: CLI name. kind: ``generate`` (scored outputs), ``ppl`` or ``agreement`` (logit metrics).
    metric: for ``generate``, ``all`` or ``part`` (RULER's string matches).
    tokens_to_generate: output budget (RULER's), counted inside the target length.
    draft: the generator (``generate`` tasks). min_units: the fewest haystack units it takes.
    needles: whether ``depth`` applies.
    """

    name: str
    kind: str
    description: str
    metric: str = ""
    tokens_to_generate: int = 0
    draft: Callable[..., Draft] | None = None
    min_units: int = 1
    needles: bool = False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("passkey", "generate", "pass key in RULER's noise haystack", "all", 32, draft_passkey, 1, True),
    Task("niah_single", "generate", "one needle (key -> 7-digit number) in KJV text", "all", 128,
         draft_niah_single, 1, True),
    Task("niah_multikey", "generate", "4 needles with different keys, one asked", "all", 128,
         draft_niah_multikey, 1, True),
    Task("niah_multivalue", "generate", "4 values for one key, all asked", "all", 128, draft_niah_multivalue, 1, True),
    Task("vt", "generate", "variable tracking: 1 chain of 4 hops in noise", "all", 30, draft_vt, 5),
    Task("cwe", "generate", "common-words extraction: the 10 most frequent words of a list", "all", 120,
         draft_cwe, 11),
    Task("ppl", "ppl", "perplexity of a KJV passage (teacher-forced prefill)"),
    Task("agreement", "agreement", "top-1 agreement and KL vs the dense reference, decoded token by token"),
)}
GENERATE_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "generate")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A sample's own seed: the same sample whatever else is run, in whatever order."""
    return random.Random(f"{seed}/{task}/{length}/{index}").getrandbits(63)


# --------------------------------------------------------------------------- rendering and fitting

def render(tokenizer, input_text: str, answer_prefix: str, chat: bool) -> list[int]:
    """Token ids of the prompt: the user message (in the chat template when ``chat``), then the answer prefix."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": input_text}]) + answer_prefix
        return tokenizer.encode(text, add_bos=False)
    return tokenizer.encode(input_text + " " + answer_prefix)


def make_sample(task: Task, tokenizer, length: int, index: int, seed: int = 0, depth: float | None = None,
                chat: bool = True) -> Sample:
    """The sample ``index`` of ``task`` at ``length`` tokens (prompt + tokens to generate)."""
    if task.kind != "generate" or task.draft is None:
        raise InputError(f"task {task.name!r} has no text generator (it scores a passage: see text_sample)")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    budget = length - task.tokens_to_generate
    s = sample_seed(seed, task.name, length, index)
    extra = {"long": length >= 4096} if task.name == "cwe" else {}

    def build(units: int) -> tuple[Draft, list[int]]:
        d = task.draft(random.Random(s), units, depth, **extra)
        return d, render(tokenizer, d.input, d.answer_prefix, chat)

    lo = task.min_units
    draft, ids = build(lo)
    if len(ids) > budget:
        raise InputError(f"length {length} is too short for task {task.name}: its smallest prompt is "
                         f"{len(ids)} tokens + {task.tokens_to_generate} to generate")
    hi = lo * 2
    while len(build(hi)[1]) <= budget:               # grow, then bisect: the most units that fit
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(mid)[1]) <= budget:
            lo = mid
        else:
            hi = mid
    draft, ids = build(lo)
    depths = tuple(round(draft.context.index(n) / len(draft.context), 4) for n in draft.needles)
    return Sample(task.name, length, index, s, ids, draft.input, draft.answer_prefix, draft.answers, lo, depths)


def text_tokens(tokenizer, length: int, index: int, seed: int = 0) -> list[int]:
    """Exactly ``length`` tokens of KJV text from a verse drawn by (seed, index) (ppl, agreement).

    The start does not depend on ``length``: sample ``index`` at 1K is the first 1K tokens of the
    same sample at 8K, so scores at different lengths differ by context, not by text.
    """
    rng = random.Random(sample_seed(seed, "text", 0, index))
    verses = corpora.kjv_verses()
    start = rng.randrange(len(verses))
    chars = length * 8 + 256                          # plenty: no tokenizer averages 8 characters a token
    text, i = [], start
    while sum(map(len, text)) < chars:
        text.append(verses[i % len(verses)])
        i += 1
    ids = tokenizer.encode(" ".join(text))
    if len(ids) < length:
        raise InputError(f"could not draw {length} tokens of text")
    return ids[:length]
