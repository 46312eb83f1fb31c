"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions and /v1/models, and
/health, over a running `Engine`.

Requests are checked and tokenized here, then handed to the engine; their text comes back as the
engine decodes it, as one response or as server-sent events. Bad input is an HTTP 4xx with
OpenAI's error body; a client that goes away cancels its request, which frees its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from palm.errors import PalmError
from palm.inference.chat import prompt_ids as chat_prompt_ids
from palm.inference.decoding import check_context
from palm.inference.sampling import check_sampling_options
from palm.prompts import PromptStyle
from palm.serve import schemas
from palm.serve.engine import Engine, Failed, Job, Piece, Sampling
from palm.serve.schemas import ApiError, ChatRequest, CompletionRequest

log = logging.getLogger("palm.serve")

MAX_STOPS = 4  # as OpenAI's API
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServeSettings:
    """What the API needs besides the engine: the model's public name, the chat format, the key."""

    model_name: str
    style: PromptStyle
    chat_stops: list[str] = field(default_factory=list)  # stop strings every chat reply gets
    api_key: str | None = None


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The ASGI app; it starts the engine's thread on startup and stops it on shutdown (after
    uvicorn has let the open streams finish)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="palm", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = schemas.now()
    vocabulary = engine.decoder.config.num_tokens

    if settings.api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(schemas.error_body(f"the request body is not valid JSON ({first.get('msg')})"),
                                status_code=400)
        param = error_param(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else f"the request body: {first.get('msg')}"
        return JSONResponse(schemas.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(schemas.error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(schemas.error_body(f"internal error: {type(e).__name__}", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": created, "owned_by": "palm"}
        ]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_request(body, settings.model_name)
        prompts = completion_prompts(body.prompt, engine.tokenizer, vocabulary)
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_MAX_TOKENS
        if body.max_tokens is None:  # the default is capped by the context; a given value is checked
            max_tokens = max(1, min(max_tokens, engine.max_seq_len - max(len(p) for p in prompts)))
        job = make_job(body, prompts, max_tokens, stop_list(body.stop), engine, "prompt")
        return await respond(job, body, engine, settings, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_request(body, settings.model_name)
        ids = chat_prompt(body, settings.style, engine.tokenizer)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else max(1, engine.max_seq_len - len(ids))
        job = make_job(body, [ids], max_tokens, stop_list(body.stop) + settings.chat_stops, engine, "messages")
        return await respond(job, body, engine, settings, request, chat=True)

    return app


class ApiKeyCheck:
    """ASGI middleware: requests under /v1 need `Authorization: Bearer <api_key>` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(given, self.api_key):
                problem = "incorrect API key" if given else "no API key given"
                body = schemas.error_body(f"{problem}: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_param(loc: tuple) -> str | None:
    """The field a validation error is about, as `messages.0.content`: pydantic's location without
    the leading "body" and without the union member it tried last (`str`, `list[int]`, ...)."""
    parts = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def check_request(body: schemas._Generation, model_name: str) -> None:
    if body.model != model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if unsupported := body.unsupported():
        raise ApiError(400, f"palm serve does not support {', '.join(unsupported)}", param=unsupported[0],
                       code="unsupported_parameter")


def completion_prompts(prompt, tokenizer, vocabulary: int) -> list[list[int]]:
    """The prompt field (a string, strings, token ids, or lists of token ids) as token id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: give at least one prompt", param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    for i, row in enumerate(ids):
        if not row:
            raise ApiError(400, f"prompt {i}: empty (it encodes to no tokens)", param="prompt")
        if min(row) < 0 or max(row) >= vocabulary:
            raise ApiError(400, f"prompt {i}: token ids must be in [0, {vocabulary})", param="prompt")
    return ids


def chat_prompt(body: ChatRequest, style: PromptStyle, tokenizer) -> list[int]:
    """The conversation rendered in the model's prompt style, ending where the reply begins."""
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")
            content = "".join(part.text for part in content)
        if content is None:
            raise ApiError(400, f"messages.{i}.content: missing", param=f"messages.{i}.content")
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    try:
        return chat_prompt_ids(tokenizer, style, messages, max_len=1 << 62)  # never shortened: checked below
    except PalmError as e:
        raise ApiError(400, str(e), param="messages") from None


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


def make_job(body: schemas._Generation, prompts: list[list[int]], max_tokens: int, stops: list[str], engine: Engine,
             prompt_param: str) -> Job:
    """A `Job` for the engine from a checked request (its `on_event` set by `respond`)."""
    n = body.n if body.n is not None else 1
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", param="n")
    if n * len(prompts) > engine.max_batch_size:
        raise ApiError(400, f"n: {n} choices x {len(prompts)} prompts = {n * len(prompts)} sequences; this server "
                            f"decodes at most {engine.max_batch_size} at once (--max_batch_size)", param="n")
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    for prompt in prompts:
        try:
            check_context(len(prompt), max_tokens, engine.max_seq_len)
        except PalmError as e:
            param = prompt_param if len(prompt) >= engine.max_seq_len else "max_tokens"
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p,
                        top_k=body.top_k, filter_thres=body.filter_thres)
    try:
        check_sampling_options(sampling.temperature, sampling.filter_thres, sampling.top_k, sampling.top_p)
    except PalmError as e:
        raise ApiError(400, str(e), param=str(e).split()[0]) from None
    return Job(prompts=prompts, max_tokens=max_tokens, on_event=lambda event: None, n=n, sampling=sampling,
               stops=stops, seed=body.seed)


async def respond(job: Job, body: schemas._Generation, engine: Engine, settings: ServeSettings, request: Request,
                  *, chat: bool):
    """Run `job` and answer with the whole result, or with a stream of chunks if asked."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[list[Piece] | Failed] = asyncio.Queue()
    job.on_event = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    prompt_tokens = sum(len(p) for p in job.prompts)
    meta = {"id": schemas.new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": schemas.now(), "model": settings.model_name}
    engine.submit(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_chunks(job, events, engine, meta, prompt_tokens, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    texts, finishes, counts = [""] * job.size, [None] * job.size, [0] * job.size
    gone = asyncio.ensure_future(client_gone(request))
    try:
        while None in finishes:
            got = asyncio.ensure_future(events.get())
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                return None  # nobody to answer
            event = got.result()
            if isinstance(event, Failed):
                raise ApiError(500, event.message, type="server_error")
            for piece in event:
                texts[piece.index] += piece.text
                if piece.finish_reason:
                    finishes[piece.index], counts[piece.index] = piece.finish_reason, piece.completion_tokens
    finally:
        gone.cancel()
        engine.cancel(job)  # a no-op once every choice has finished
    make = schemas.chat_choice if chat else schemas.completion_choice
    return {**meta, "choices": [make(i, texts[i], finishes[i]) for i in range(job.size)],
            "usage": schemas.usage(prompt_tokens, sum(counts))}


async def client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream_chunks(job: Job, events: asyncio.Queue, engine: Engine, meta: dict, prompt_tokens: int, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ending with `data: [DONE]`. Stopping early
    (the client went away and Starlette cancelled the response) cancels the job."""
    meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str | None, finish_reason: str | None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = schemas.chat_delta(index, delta, finish_reason)
        else:
            choice = schemas.completion_choice(index, text or "", finish_reason)
        return schemas.sse({**meta, "choices": [choice], **extra})

    try:
        if chat:
            for i in range(job.size):
                yield schemas.sse({**meta, "choices": [schemas.chat_delta(i, {"role": "assistant", "content": ""}, None)],
                                   **extra})
        remaining, completion_tokens = job.size, 0
        while remaining:
            event = await events.get()
            if isinstance(event, Failed):
                yield schemas.sse(schemas.error_body(event.message, type="server_error"))
                return
            for piece in event:
                if piece.text:
                    yield chunk(piece.index, piece.text, None)
                if piece.finish_reason:
                    remaining -= 1
                    completion_tokens += piece.completion_tokens
                    yield chunk(piece.index, None, piece.finish_reason)
        if include_usage:
            yield schemas.sse({**meta, "choices": [], "usage": schemas.usage(prompt_tokens, completion_tokens)})
        yield schemas.sse("[DONE]")
    finally:
        engine.cancel(job)
