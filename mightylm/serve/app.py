"""The OpenAI-compatible HTTP layer over the engine (FastAPI): it validates, queues and forwards.

    GET  /v1/models                 the base model and "<base>:<adapter>" for each loaded adapter
    POST /v1/completions            prompt (text, or a list of token ids) -> text; stream=true gives server-sent
                                    events; echo=true with max_tokens=0 and logprobs=K scores the prompt
                                    (log-likelihood and perplexity evaluation)
    POST /v1/chat/completions       messages -> reply, through the model's chat template
    GET  /admin/adapters            loaded adapters;  POST {"name", "path"} loads one;  DELETE /admin/adapters/NAME
    GET  /health, GET /metrics      liveness and load; Prometheus text format
    GET  /                          the chat page

Every error is an OpenAI-style error object with a 4xx/5xx status; a bad request never stops the
server. With API keys, /v1, /admin and /metrics need "Authorization: Bearer KEY" (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mightylm.generate import Sampling
from mightylm.serve.engine import Engine, QueueFull, Sequence

MAX_BODY = 1 << 20  # bytes
DRAIN_LIMIT = 16 << 20  # bytes of a refused body (413, 401) read and discarded before answering
MAX_N = 8
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "user", "stream_options",
          "max_completion_tokens", "ignore_eos"}  # ignore_eos: vLLM's extension, for benchmarks of fixed length
FIELDS = {"/v1/completions": COMMON | {"prompt", "echo", "logprobs"}, "/v1/chat/completions": COMMON | {"messages"},
          "/admin/adapters": {"name", "path"}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


async def _read_body(request: Request, keep: int) -> bytes | None:
    """The request's body, or None when it is over `keep` bytes. A body that is refused is still read to its
    end (up to DRAIN_LIMIT) and thrown away, as nginx's lingering close does: answering while the client is
    still sending makes its kernel see a reset, not our answer."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= keep:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    return b"".join(chunks) if size <= keep else None


def create_app(engine: Engine, name: str, *, api_keys: tuple[str, ...] = ()):
    app = FastAPI(title="mightylm", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, bank = engine.tokenizer, engine.bank

    def error(status, message, kind="invalid_request_error", param=None, headers=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error(400, f"invalid request: {e.errors()[:1]}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        guarded = request.url.path.startswith(("/v1", "/admin", "/metrics"))
        if api_keys and guarded:
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer ") or given[7:] not in api_keys:
                await _read_body(request, keep=0)  # drained, not kept
                return error(401, "missing or invalid API key: send Authorization: Bearer KEY", "authentication_error")
        return await call_next(request)

    async def body_of(request: Request, path: str) -> dict:
        raw = await _read_body(request, keep=MAX_BODY)
        if raw is None:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8") from None
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - FIELDS[path])
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
        return body

    def adapter_of(body: dict) -> int:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "\"model\" is required: a string (see GET /v1/models)", param="model")
        base, _, adapter = model.partition(":")
        if base != name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {name!r} and "
                                f"{', '.join(repr(f'{name}:{a}') for a in bank.ids) or 'no adapters'}",
                           "not_found", "model")
        if adapter and adapter not in bank.ids:
            raise ApiError(404, f"adapter {adapter!r} is not loaded; loaded: {', '.join(bank.ids) or 'none'}",
                           "not_found", "model")
        return bank.ids.get(adapter, 0)

    def sampling_of(body: dict, prompt_len: int) -> tuple[Sampling, int]:
        def number(key, default, lo, hi, kind=(int, float)):
            value = body.get(key, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
                raise ApiError(400, f"\"{key}\" must be a number from {lo} to {hi}, got {value!r}", param=key)
            return value

        room = engine.max_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; the context holds {engine.max_len}",
                           param="messages" if "messages" in body else "prompt")
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        if limit is None:
            limit = min(256, room)
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ApiError(400, f"\"max_tokens\" must be a positive integer, got {limit!r}", param="max_tokens")
        elif limit > room:
            raise ApiError(400, f"max_tokens {limit} + the prompt's {prompt_len} tokens exceed the context of "
                                f"{engine.max_len} tokens", param="max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise ApiError(400, "\"stop\" must be a string or a list of up to 4 non-empty strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"\"seed\" must be an integer, got {seed!r}", param="seed")
        n = number("n", 1, 1, MAX_N, int)
        s = Sampling(max_new_tokens=limit, temperature=float(number("temperature", 1.0, 0, 2)),
                     top_p=float(number("top_p", 1.0, 1e-6, 1)), seed=seed, stop=tuple(stop),
                     stop_token_ids=tokenizer.stop_token_ids)
        return s, n

    def token_ids(prompt) -> bool:
        return isinstance(prompt, list) and len(prompt) > 0 and all(type(t) is int for t in prompt)

    def prompt_of(body: dict, path: str) -> list[int]:
        if path == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if token_ids(prompt):  # OpenAI's "array of tokens" form: the ids are used as given
                vocab = engine.model.config.vocab_size
                bad = next((t for t in prompt if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ApiError(400, f"token id {bad} in \"prompt\" is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                return list(prompt)
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "\"prompt\" must be a non-empty string or a non-empty list of token ids",
                               param="prompt")
            return tokenizer.encode(prompt)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "\"messages\" must be a non-empty list of {role, content}", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}",
                               param="messages")
        try:
            return tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    async def generate(request: Request, path: str):
        body = await body_of(request, path)
        adapter = adapter_of(body)
        prompt = prompt_of(body, path)
        echo, logprobs = body.get("echo", False), body.get("logprobs")
        if not isinstance(echo, bool):
            raise ApiError(400, "\"echo\" must be true or false", param="echo")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 5):
            raise ApiError(400, f"\"logprobs\" must be an integer from 0 to 5, got {logprobs!r}", param="logprobs")
        if echo and body.get("max_tokens") == 0:
            return await score(body, adapter, prompt, logprobs)
        if logprobs is not None:
            raise ApiError(400, "\"logprobs\" is supported for the prompt only (echo: true with max_tokens: 0), "
                                "not for generated tokens", param="logprobs")
        s, n = sampling_of(body, len(prompt) + bank.prefix_len(adapter))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "\"stream\" must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "\"stream_options\" must be {\"include_usage\": true|false}", param="stream_options")
        echoed = prompt_text(body) if echo else ""
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "\"ignore_eos\" must be true or false", param="ignore_eos")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:
            for i in range(n):
                seed = None if s.seed is None else s.seed + i
                settings = Sampling(**{**s.__dict__, "seed": seed})
                emit = (lambda i: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))(i)
                seqs.append(engine.submit(Sequence(prompt, settings, emit, adapter=adapter, ignore_eos=ignore_eos)))
        except QueueFull as e:
            for seq in seqs:
                seq.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        chat = path == "/v1/chat/completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body["model"]
        kind = "chat.completion" if chat else "text_completion"

        def chunk(i, text=None, finish=None, first=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish}
            return {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": model,
                    "choices": [choice]}

        def usage_of(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt) + completion_tokens}

        if stream:
            async def sse():
                done, generated = 0, 0
                try:
                    for i in range(n):
                        if chat:
                            yield f"data: {json.dumps(chunk(i, first=True))}\n\n"
                        elif echoed:
                            yield f"data: {json.dumps(chunk(i, echoed))}\n\n"
                    while done < n:
                        i, ev = await events.get()
                        if ev["type"] == "text":
                            yield f"data: {json.dumps(chunk(i, ev['text']))}\n\n"
                        else:
                            done += 1
                            generated += ev["completion_tokens"]
                            if ev.get("error"):
                                yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                            yield f"data: {json.dumps(chunk(i, finish=_reason(ev)))}\n\n"
                    if options.get("include_usage"):  # OpenAI's last chunk: no choices, the request's usage
                        last = {**chunk(0), "choices": [], "usage": usage_of(generated)}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away, or we are done: free the rows either way
                    for seq in seqs:
                        seq.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, usage = [echoed] * n, [None] * n, [0] * n
        done = 0
        try:
            while done < n:
                i, ev = await events.get()
                if ev["type"] == "text":
                    texts[i] += ev["text"]
                else:
                    done += 1
                    if ev.get("error"):
                        raise ApiError(500, f"generation failed: {ev['error']}", "server_error")
                    reasons[i], usage[i] = _reason(ev), ev["completion_tokens"]
        finally:
            for seq in seqs:
                seq.cancel()
        choices = [({"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i]}
                    if chat else {"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None})
                   for i in range(n)]
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
                "usage": usage_of(sum(usage))}

    def prompt_text(body: dict) -> str:
        prompt = body["prompt"]
        if token_ids(prompt):
            return tokenizer.decode(prompt)
        return prompt if isinstance(prompt, str) else prompt[0]

    async def score(body: dict, adapter: int, prompt: list[int], logprobs: int | None):
        """echo + max_tokens 0: the prompt back with each token's log-probability (no generation)."""
        if body.get("stream") or body.get("n", 1) != 1:
            raise ApiError(400, "scoring a prompt (echo with max_tokens 0) takes neither stream nor n > 1")
        if len(prompt) + bank.prefix_len(adapter) > engine.max_len:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds {engine.max_len}",
                           param="prompt")
        scored = await asyncio.to_thread(engine.score, prompt, adapter, logprobs or 0)
        choice = {"index": 0, "text": prompt_text(body), "finish_reason": "length",
                  "logprobs": scored if logprobs is not None else None}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models():
        names = [name] + [f"{name}:{a}" for a in bank.ids]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mightylm"}
                                           for m in names]}

    @app.get("/admin/adapters")
    async def adapters():
        return {"adapters": [{"name": a, "kind": bank.kinds[a], "model": f"{name}:{a}"} for a in bank.ids]}

    @app.post("/admin/adapters")
    async def add_adapter(request: Request):
        body = await body_of(request, "/admin/adapters")
        if not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, "send {\"name\": string, \"path\": adapter directory on the server}")
        if not Path(body["path"]).is_dir():
            raise ApiError(400, f"{body['path']}: no such adapter directory on the server", param="path")
        from mightylm.adapters import AdapterError

        try:
            what = await asyncio.to_thread(engine.call, lambda: bank.add(body["name"], body["path"]))
        except AdapterError as e:
            raise ApiError(400, str(e)) from None
        return {"name": body["name"], "model": f"{name}:{body['name']}", "loaded": what}

    @app.delete("/admin/adapters/{adapter}")
    async def remove_adapter(adapter: str):
        if adapter not in bank.ids:
            raise ApiError(404, f"adapter {adapter!r} is not loaded", "not_found")

        def remove():
            busy = [s for s in engine.running + list(engine.waiting) if s.adapter == bank.ids[adapter]]
            if busy:
                raise ApiError(409, f"adapter {adapter!r} is serving {len(busy)} requests; retry when they finish",
                               "conflict", headers={"Retry-After": "1"})
            bank.remove(adapter)

        await asyncio.to_thread(engine.call, remove)
        return {"name": adapter, "unloaded": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **engine.load()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse((Path(__file__).parent / "chat.html").read_text())

    return app


def _reason(event: dict) -> str:
    return "length" if event["finish_reason"] == "length" else "stop"


def render_metrics(engine: Engine) -> str:
    s, load = engine.stats, engine.load()
    lines = ["# TYPE mightylm_requests_total counter", f"mightylm_requests_total {s['requests']}",
             "# TYPE mightylm_prompt_tokens_total counter", f"mightylm_prompt_tokens_total {s['prompt_tokens']}",
             "# TYPE mightylm_generated_tokens_total counter",
             f"mightylm_generated_tokens_total {s['generated_tokens']}",
             "# TYPE mightylm_prefill_passes_total counter", f"mightylm_prefill_passes_total {s['prefill_passes']}",
             "# TYPE mightylm_finished_total counter"]
    lines += [f'mightylm_finished_total{{reason="{k}"}} {v}' for k, v in sorted(s["finished"].items())]
    lines += ["# TYPE mightylm_queue_length gauge", f"mightylm_queue_length {load['waiting']}",
              "# TYPE mightylm_running gauge", f"mightylm_running {load['running']}"]
    for key, metric in (("ttft", "mightylm_time_to_first_token_seconds"),
                        ("itl", "mightylm_inter_token_latency_seconds")):
        lat = s[key]
        lines.append(f"# TYPE {metric} summary")
        lines += [f'{metric}{{quantile="{q}"}} {lat.quantile(q):.6f}' for q in (0.5, 0.9, 0.99)]
        lines += [f"{metric}_sum {lat.sum:.6f}", f"{metric}_count {lat.count}"]
    return "\n".join(lines) + "\n"
