"""`meshpar serve`: an OpenAI-compatible HTTP server over a model split for generation.

    meshpar serve --checkpoint runs/ck --tp 2 --port 8000
    curl localhost:8000/v1/completions -d '{"model": "ck", "prompt": "Once", "max_tokens": 16}'

Rank 0 runs the HTTP server (FastAPI on uvicorn) in its main thread and the engine's
driver (engine.py) in another; every other rank follows the driver's commands. Requests
become engine requests: they join the running batch between decode steps, and each
token goes back to its request's response as it comes - as server-sent events when the
request streams. SIGTERM or Ctrl-C stops taking requests, lets the running ones finish,
and stops every rank.

    GET  /health          {"status": "ok"} while the engine runs
    GET  /v1/models       the one model, by --name
    POST /v1/completions  prompt (text, texts, token ids), max_tokens (16), temperature
                          (1), top_p (1), top_k (meshpar's; 0: off), seed (default: drawn),
                          stop (strings), stream

A request it cannot serve gets a 4xx with OpenAI's error body,
{"error": {"message", "type", "param", "code"}}, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from meshpar.serve.engine import Engine, Request
from meshpar.serve.sampling import SamplingRule
from meshpar.serve.text import Codec, StreamDecoder


class BadRequest(Exception):
    """What the client asked for cannot be served: an OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """A checked /v1/completions request: its prompts' token ids and how to continue them."""

    prompts: list[list[int]]
    max_tokens: int
    rule: SamplingRule
    stop: list[str]
    stream: bool


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(f"'{name}' must be {bounds}, got {value}", name)
    return kind(value)


def parse_completion(raw: bytes, name: str, codec: Codec, positions: int) -> Completion:
    """The request, or BadRequest naming what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", "model")
    if model != name:
        raise BadRequest(f"the model '{model}' does not exist; this server has '{name}'", "model", 404,
                         code="model_not_found")
    for unsupported in ("echo", "logprobs", "suffix", "logit_bias"):
        if body.get(unsupported) not in (None, False, 0, {}):
            raise BadRequest(f"'{unsupported}' is not supported by meshpar serve", unsupported)
    if _number(body, "n", 1, int, 1) != 1 or _number(body, "best_of", 1, int, 1) != 1:
        raise BadRequest("only one completion per prompt (n=1, best_of=1) is supported", "n")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest("'prompt' must be a string, a list of strings, or token ids", "prompt")
    prompts = []
    for p in prompt:
        ids = codec.encode(p) if isinstance(p, str) else p
        if not ids:
            raise BadRequest("a prompt is empty", "prompt")
        if not all(isinstance(t, int) and 0 <= t < codec.vocab_size for t in ids):
            raise BadRequest(f"token ids must be integers in [0, {codec.vocab_size})", "prompt")
        prompts.append(ids)
    max_tokens = _number(body, "max_tokens", 16, int, 1)
    for ids in prompts:
        if len(ids) + max_tokens > positions:
            raise BadRequest(f"this model's maximum context length is {positions} tokens; the request asks for "
                             f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                             "max_tokens", code="context_length_exceeded")
    seed = body.get("seed")
    rule = SamplingRule(temperature=_number(body, "temperature", 1.0, float, 0, 2),
                        top_k=_number(body, "top_k", 0, int, 0),
                        top_p=_number(body, "top_p", 1.0, float, 0, 1),
                        seed=random.getrandbits(62) if seed is None else _number(body, "seed", 0, int, 0, 2**62))
    if rule.top_p == 0:
        raise BadRequest("'top_p' must be above 0", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return Completion(prompts, max_tokens, rule, stop, stream)


class TextOut:
    """One choice's text as its tokens come: decoded without splitting a character, and
    ended at the first stop string (which is left out; text that may begin one is held
    back until it cannot)."""

    def __init__(self, codec: Codec, stop: list[str]):
        self.decoder, self.stop = StreamDecoder(codec), stop
        self.held, self.stopped = "", False

    def push(self, token: int, last: bool) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.push(token) + (self.decoder.flush() if last else "")
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            piece, self.held = self.held[:min(hits)], ""
            return piece
        keep = 0 if last else max((len(s) - 1 for s in self.stop), default=0)
        piece = self.held[:len(self.held) - keep]
        self.held = self.held[len(piece):]
        return piece


def build_app(engine: Engine, codec: Codec, name: str, positions: int, healthy: threading.Event):
    """The FastAPI application over a running engine's driver."""
    app = FastAPI(title="meshpar serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    def error(err: BadRequest) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return error(BadRequest(str(exc.detail), status=exc.status_code,
                                code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return error(BadRequest(str(exc)))

    @app.get("/health")
    async def health():
        if not healthy.is_set():
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "meshpar",
                                            "max_model_len": positions}]}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        try:
            completion = parse_completion(await http.body(), name, codec, positions)
        except BadRequest as err:
            return error(err)
        if not healthy.is_set():
            return error(BadRequest("the server is stopping", status=503, kind="server_error"))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        outs = [TextOut(codec, completion.stop) for _ in completion.prompts]

        def on_token(request: Request, token: int, index: int) -> None:  # the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (index, request, token))

        requests = [Request(ids, completion.max_tokens, completion.rule, codec.stop,
                            on_token=lambda r, t, i=i: on_token(r, t, i)) for i, ids in enumerate(completion.prompts)]
        for request in requests:
            engine.submit(request)
        ident = f"cmpl-{uuid.uuid4().hex}"

        def chunk(index: int, text: str, reason: str | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": name,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}

        async def pieces():
            """(index, text, finish reason or None) as the tokens come, to every request's end."""
            open_requests = len(requests)
            while open_requests:
                index, request, token = await events.get()
                out = outs[index]
                last = request.finish_reason is not None
                piece = out.push(token, last)
                if out.stopped and not last:
                    request.cancelled = "stop"  # a stop string: end it at its next token
                if last:
                    open_requests -= 1
                    yield index, piece, "stop" if out.stopped else request.finish_reason
                elif piece:
                    yield index, piece, None

        usage = lambda: {"prompt_tokens": sum(map(len, completion.prompts)),  # noqa: E731
                         "completion_tokens": sum(len(r.tokens) for r in requests),
                         "total_tokens": sum(len(p) + len(r.tokens) for p, r in zip(completion.prompts, requests))}
        if completion.stream:
            async def events_stream():
                try:
                    async for index, piece, reason in pieces():
                        yield f"data: {json.dumps(chunk(index, piece, reason))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away: end its sequences
                    for request in requests:
                        request.cancelled = request.cancelled or "cancelled"
            return StreamingResponse(events_stream(), media_type="text/event-stream")
        texts, reasons = [""] * len(requests), [None] * len(requests)
        async for index, piece, reason in pieces():
            texts[index] += piece
            reasons[index] = reason or reasons[index]
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                            for i, (text, reason) in enumerate(zip(texts, reasons))],
                "usage": usage()}

    return app


def serve_http(engine: Engine, codec: Codec, name: str, host: str, port: int, describe: str) -> None:
    """Serve on host:port until SIGTERM or Ctrl-C (the driver's main thread), the engine
    in a thread of its own; then finish what runs and stop every rank."""
    import uvicorn

    healthy = threading.Event()
    app = build_app(engine, codec, name, engine.positions, healthy)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            engine.serve()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failure.append(err)
            healthy.clear()
            server.should_exit = True

    thread = threading.Thread(target=drive, name="meshpar-engine", daemon=True)
    healthy.set()
    thread.start()
    print(f"meshpar serve: {name} ({describe}) on http://{host}:{port}/v1 - Ctrl-C or SIGTERM to stop",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM and SIGINT while it runs (it stops taking connections and
    # lets the running requests finish), then raises the signal again for the handler
    # that was there before: this one, so that the ranks are stopped and the exit is clean.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        healthy.clear()
        engine.shutdown()
        thread.join()
    if failure:
        raise RuntimeError(f"the generation engine failed: {failure[0]!r}") from failure[0]
    print("meshpar serve: stopped", file=sys.stderr, flush=True)
