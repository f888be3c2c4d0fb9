"""Writes kjv_lastword.jsonl (40 verses, seed 0) and, with --tokenizer DIR, the embedded model's
tokenizer as a Hugging Face directory for lm-eval's tokenizer_backend=huggingface."""

import argparse
import json
import os
import random

from kvoffload.eval.corpora import kjv_verses

HERE = os.path.dirname(os.path.abspath(__file__))


def write_data() -> None:
    verses = [v.strip() for v in kjv_verses() if 60 <= len(v.strip()) <= 160]
    with open(os.path.join(HERE, "kjv_lastword.jsonl"), "w") as f:
        for v in random.Random(0).sample(verses, 40):
            ctx, _, last = v.rstrip(".;:,!?").rpartition(" ")
            f.write(json.dumps({"context": ctx, "target": last}) + "\n")


def write_tokenizer(out: str, model: str | None) -> None:
    from kvoffload.model.loader.gguf_file import GGUFFile
    from kvoffload.model.registry import resolve_model
    from kvoffload.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(GGUFFile(resolve_model(model)).metadata)
    os.makedirs(out, exist_ok=True)
    tok.backend.save(os.path.join(out, "tokenizer.json"))
    name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
                   "eos_token": name(tok.eos_id), "add_bos_token": tok.add_bos, "model_max_length": 8192}, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("-m", "--model", default=None)
    args = ap.parse_args()
    if args.tokenizer:
        write_tokenizer(args.tokenizer, args.model)
    else:
        write_data()
