"""``kvoffload batch IN.jsonl -o OUT.jsonl``: an offline job in the OpenAI batch format.

Each input line is ``{"custom_id": ..., "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body": {...}}``; each output line is ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`` — the body a completion or chat completion
object, or an error object (status 400) for a request the model cannot serve. The input is
checked whole before anything runs (a bad line is a one-line error naming it).

Requests run in the order of their prompts' tokens, so those sharing a prefix (questions about
one document, one system prompt) run one after another: with ``--kv-store`` the prefix is
prefilled once and read back for the others. Each result is appended to OUT as one ``write``
and flushed (fsynced) as soon as its request finishes. A job killed at any point resumes with
the same command: the ids already in OUT are skipped, a line cut short by the kill is removed,
and the job ends with every id present exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig
from kvoffload.errors import InputError

URLS = ("/v1/completions", "/v1/chat/completions")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="run an offline job of OpenAI batch requests (JSONL in, JSONL out; resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="requests, one JSON object a line (OpenAI batch format)")
    p.add_argument("-o", "--output", required=True, help="results, appended one line per request as it finishes; "
                                                         "rerun the same command to resume a killed job")
    p.add_argument("--model-name", default=None, help="the model name results report (default: the model's file name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_args(p, EngineConfig)
    p.set_defaults(run=run)


@dataclass
class Job:
    """One input line: its id, endpoint, and request body (validated)."""

    line: int
    custom_id: str
    url: str
    body: Any            # CompletionRequest or ChatRequest


def read_input(path: str) -> list[Job]:
    """Every input line parsed and validated (one-line InputError naming the first bad line)."""
    from pydantic import ValidationError

    from kvoffload.serve.protocol import ChatRequest, CompletionRequest

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    jobs, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected an object with custom_id, method, url and body")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise InputError(f"{where}: custom_id must be a non-empty string")
        if cid in seen:
            raise InputError(f"{where}: custom_id {cid!r} appears twice")
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            raise InputError(f"{where}: method must be POST")
        url = obj.get("url")
        if url not in URLS:
            raise InputError(f"{where}: url must be one of {', '.join(URLS)}, got {url!r}")
        cls = CompletionRequest if url == URLS[0] else ChatRequest
        try:
            body = cls.model_validate(obj.get("body"))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "body"
            raise InputError(f"{where}: body.{field}: {err['msg']}") from None
        if body.n != 1:
            raise InputError(f"{where}: n must be 1 in a batch (one line per request)")
        if url == URLS[0] and not (isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))):
            raise InputError(f"{where}: prompt must be one string or one list of token ids in a batch")
        jobs.append(Job(n, cid, url, body))
    return jobs


def done_ids(path: str) -> set[str]:
    """custom_ids already answered in OUT; a last line cut short (a kill mid-write) is removed."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):                              # a torn last line: drop it
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    ids = set()
    for n, line in enumerate(data[:keep].decode("utf-8", "replace").splitlines(), 1):
        try:
            cid = json.loads(line)["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path} line {n} is not a result line; is -o the output of another job?") from None
        ids.add(cid)
    return ids


class Writer:
    """Appends result lines: each one ``write`` of a whole line, then fsync."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None

    def put(self, obj: dict) -> None:
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _result(job: Job, status: int, body: dict) -> dict:
    return {"id": f"batch_req_{job.line}", "custom_id": job.custom_id,
            "response": {"status_code": status, "request_id": f"req_{job.line}", "body": body}, "error": None}


def _error_body(message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def run(args: argparse.Namespace) -> int:
    engine_cfg = dataclass_from_args(EngineConfig, args)
    jobs = read_input(args.input)
    done = done_ids(args.output)
    pending = [j for j in jobs if j.custom_id not in done]
    print(f"batch: {len(jobs)} requests, {len(jobs) - len(pending)} already in {args.output}", file=sys.stderr)
    if not pending:
        return 0

    from kvoffload.api import LLM
    from kvoffload.cli.serve import model_name
    from kvoffload.model.generation import checkpoint_sampling_defaults
    from kvoffload.model.registry import resolve_model
    from kvoffload.serve.protocol import RequestError, sampling_params

    llm = LLM(config=engine_cfg)
    path = resolve_model(engine_cfg.model, engine_cfg.cache_dir)
    name = args.model_name or model_name(engine_cfg, path)
    defaults = checkpoint_sampling_defaults(path)
    out = Writer(args.output)
    eng = llm.engine
    work = []                                              # (prompt ids, job, params)
    for job in pending:
        b = job.body
        try:
            if job.url == URLS[0]:
                ids = llm.encode(b.prompt)
                max_tokens = b.max_tokens if b.max_tokens is not None else eng._context
            else:
                text = llm.tokenizer.apply_chat_template(b.chat_messages())
                ids = llm.tokenizer.encode(text, add_bos=False)
                max_tokens = b.max_completion_tokens or b.max_tokens or eng._context
            if b.logprobs or getattr(b, "echo", False):
                raise RequestError(400, "logprobs and echo are not available in a batch", "logprobs")
            params = sampling_params(b, defaults, max(1, min(max_tokens, eng._context - len(ids))), None, None)
            eng.check_request(ids, params)
        except RequestError as e:
            out.put(_result(job, e.status, _error_body(e.message, e.param)))
            continue
        except Exception as e:   # noqa: BLE001 - a request the model cannot serve is that request's error line
            from kvoffload.errors import KvoffloadError

            if not isinstance(e, KvoffloadError):
                raise
            out.put(_result(job, 400, _error_body(str(e))))
            continue
        work.append((ids, job, params))
    work.sort(key=lambda w: w[0])                          # shared prefixes next to each other
    bar = _bar(len(jobs), len(jobs) - len(pending) + (len(pending) - len(work)), args.no_progress)
    try:
        queue = iter(work)
        running: dict[int, tuple[list[int], Job]] = {}
        window = 2 * engine_cfg.max_num_seqs               # admitted in prefix order, a few ahead
        while True:
            while len(running) < window:
                nxt = next(queue, None)
                if nxt is None:
                    break
                ids, job, params = nxt
                running[eng.add_request(ids, params)] = (ids, job)
            if not running:
                break
            for o in eng.step():
                if not o.finished:
                    continue
                ids, job = running.pop(o.seq_id)
                seq = eng.pop_finished(o.seq_id)
                out.put(_result(job, 200, _body(job, seq, ids, name)))
                bar.update(1)
    finally:
        bar.close()
        out.close()
    print(f"batch: done; {args.output} holds {len(jobs)} results", file=sys.stderr)
    report = llm.kv_report()
    if report:
        print(report, file=sys.stderr)
    return 0


def _body(job: Job, seq, ids: list[int], model: str) -> dict:
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(seq.output_ids),
             "total_tokens": len(ids) + len(seq.output_ids),
             # prompt tokens not prefilled: shared from a live sequence or read from the KV store
             "prompt_tokens_details": {"cached_tokens": seq.shared_tokens + seq.reused_tokens}}
    created = int(time.time())
    if job.url == URLS[0]:
        return {"id": f"cmpl-{job.line}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": seq.text, "logprobs": None, "finish_reason": seq.finish_reason}],
                "usage": usage}
    return {"id": f"chatcmpl-{job.line}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": seq.text},
                         "finish_reason": seq.finish_reason}], "usage": usage}


def _bar(total: int, initial: int, off: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="req", desc="batch", disable=True if off else None,
                file=sys.stderr)
