"""The OpenAI-compatible HTTP layer over the engine (FastAPI): it validates, queues and forwards.

    GET  /v1/models                 the base model and "<base>:<adapter>" for each loaded adapter
    POST /v1/completions            prompt (text, or a list of token ids) -> text; stream=true gives server-sent
                                    events; echo=true with max_tokens=0 and logprobs=K scores the prompt
                                    (log-likelihood and perplexity evaluation)
    POST /v1/chat/completions       messages -> reply, through the model's chat template
    GET  /admin/adapters            loaded adapters;  POST {"name", "path"} loads one;  DELETE /admin/adapters/NAME
    With a registry (`mighty serve --registry DIR`, serve/registry.py): keys belong to users, "base:NAME" is the
    user's own adapter NAME (or one an admin shared), and each user manages their own under /admin/registry:
    GET  /admin/registry/adapters[/NAME]        (?owner=, ?version=: admins see everyone's)
    POST /admin/registry/adapters/NAME/promote {"version"}, .../rollback {};  DELETE /admin/registry/adapters/NAME
    DELETE /admin/registry/users/USER (forget me: keys, adapters, logs);  PUT .../USER/logging {"enabled"}
    GET  /health, GET /metrics      liveness and load; Prometheus text format
    GET  /                          the chat page

With `mighty serve --draft`, steps may be speculative: a request can opt out with "speculative": false, and its
usage gains {"speculative": {"drafted_tokens", "accepted_tokens", "acceptance_rate"}}.

Every error is an OpenAI-style error object with a 4xx/5xx status; a bad request never stops the
server. With API keys, /v1, /admin and /metrics need "Authorization: Bearer KEY" (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

import torch

from mightylm.errors import MightyError
from mightylm.generate import Sampling
from mightylm.multimodal.adapter import visual_terms
from mightylm.multimodal.images import MAX_IMAGE_BYTES
from mightylm.multimodal.vlm import IMAGE_TOKEN
from mightylm.serve.engine import Engine, QueueFull, Sequence, logprob_entries
from mightylm.speculative import History

MAX_BODY = 1 << 20  # bytes
MAX_IMAGE_BODY = 28 << 20  # bytes, for a vision-language model: a 20 MiB image is ~27 MiB as base64
MAX_IMAGES = 4  # images in one chat request
DRAIN_LIMIT = 16 << 20  # bytes of a refused body (413, 401) read and discarded before answering
MAX_N = 8
MAX_PROMPTS = 64  # prompts in one legacy completions request (a list of strings or of token-id lists)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 5, vLLM 20)
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "user",
          "stream_options", "max_completion_tokens", "ignore_eos",  # ignore_eos: vLLM's, for fixed-length benchmarks
          "speculative"}  # ours: false keeps a request out of speculative steps (with `mighty serve --draft`)
FIELDS = {"/v1/completions": COMMON | {"prompt", "echo", "logprobs"}, "/v1/chat/completions": COMMON | {"messages"},
          "/admin/adapters": {"name", "path"}, "promote": {"version", "owner"}, "rollback": {"owner"},
          "logging": {"enabled"}}


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


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away. (Request.is_disconnected() never sees it behind a function
    middleware, whose receive cannot be polled; a receive that waits does.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


HISTORY_TOKENS = 100_000  # the most of one user's answers a lookup history counts (~60 MB), then it starts over


def create_app(engine: Engine, name: str, *, api_keys: tuple[str, ...] = (), personal=None,
               allow_image_urls: bool = False, lookup_history: bool = False):
    """The app over `engine`, serving `name`. `personal` (serve/personal.PersonalAdapters): API keys, adapters and
    their management come from a registry of users. `allow_image_urls`: a vision-language model's requests may
    name http(s) images, which the server then fetches (off by default: the server would reach out wherever a
    request points). `lookup_history` (with a prompt-lookup draft): each requester's earlier answers, in memory,
    feed prompt lookup's drafts for their own later requests (speculative.History)."""
    app = FastAPI(title="mightylm", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, bank = engine.tokenizer, engine.bank
    histories: dict[str, History] = {}

    def history_of(request: Request, body: dict) -> History | None:
        """The requester's own lookup history: per registry user, per API key, else per the request's "user" field
        (a server without keys cannot tell its clients apart). Nobody's drafts come from another's answers: the
        acceptance their usage reports would tell them what the other was answered."""
        if not lookup_history:
            return None
        user, key = getattr(request.state, "user", None), getattr(request.state, "key", None)
        who = f"user {user.name}" if user is not None else \
            f"key {hashlib.sha256(key.encode()).hexdigest()}" if key else f"client {body.get('user') or ''}"
        return histories.setdefault(who, History(limit=HISTORY_TOKENS))

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
        if personal is not None and guarded:  # keys belong to users of the registry
            given = request.headers.get("authorization", "")
            user = await asyncio.to_thread(personal.registry.user_of_key, given[7:]) \
                if given.startswith("Bearer ") else None
            if user is None:
                await _read_body(request, keep=0)
                return error(401, "missing or invalid API key: send Authorization: Bearer KEY", "authentication_error")
            request.state.user = user
        elif api_keys and guarded:
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer ") or given[7:] not in api_keys:
                await _read_body(request, keep=0)  # drained, not kept
                return error(401, "missing or invalid API key: send Authorization: Bearer KEY", "authentication_error")
            request.state.key = given[7:]
        return await call_next(request)

    vision = engine.vision  # a VisionLanguageModel: chat messages may carry images
    body_limit = MAX_IMAGE_BODY if vision is not None else MAX_BODY
    image_field = "visual" if vision is not None and vision.mode == "adapter" else "images"  # of a Sequence

    async def body_of(request: Request, path: str) -> dict:
        raw = await _read_body(request, keep=body_limit)
        if raw is None:
            raise ApiError(413, f"request body over {body_limit} bytes" + (
                f" (images: at most {MAX_IMAGE_BYTES >> 20} MiB each)" if vision is not None else ""))
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

    async def adapter_of(body: dict, request: Request) -> int:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "\"model\" is required: a string (see GET /v1/models)", param="model")
        base, _, adapter = model.partition(":")
        if base != name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {name!r} (see GET /v1/models)",
                           "not_found", "model")
        if not adapter:
            return 0
        if adapter in bank.ids and (personal is None or adapter not in personal.loaded):
            return bank.ids[adapter]  # loaded for everyone (--adapter, /admin/adapters)
        if personal is None:
            raise ApiError(404, f"adapter {adapter!r} is not loaded; loaded: {', '.join(bank.ids) or 'none'}",
                           "not_found", "model")
        return await registry_call(personal.adapter_id, request.state.user, adapter)

    async def registry_call(fn, *args, **kwargs):
        """A registry operation, its refusals as HTTP errors (404 never says whose adapter it was)."""
        from mightylm.adapters import AdapterError
        from mightylm.serve.personal import BudgetFull
        from mightylm.serve.registry import Forbidden, NotFound, RegistryError

        try:
            if asyncio.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            return await asyncio.to_thread(fn, *args, **kwargs)
        except NotFound as e:
            raise ApiError(404, str(e), "not_found", "model") from None
        except Forbidden as e:
            raise ApiError(403, str(e), "permission_error") from None
        except BudgetFull as e:
            raise ApiError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        except (RegistryError, AdapterError) as e:
            raise ApiError(400, str(e)) from None

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
        n = number("n", 1, 1, MAX_N, int)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not -2**63 <= seed <= 2**63 - MAX_N):  # seed + i for n samples stays an int64
            raise ApiError(400, f"\"seed\" must be an integer from {-2**63} to {2**63 - MAX_N}, got {seed!r}",
                           param="seed")
        top_k = number("top_k", -1, -1, 1 << 20, int)  # vLLM's extension; -1 (or 0) turns it off
        s = Sampling(max_new_tokens=limit, temperature=float(number("temperature", 1.0, 0, 2)),
                     top_p=float(number("top_p", 1.0, 1e-6, 1)), top_k=top_k if top_k > 0 else None, seed=seed,
                     stop=tuple(stop), stop_token_ids=tokenizer.stop_token_ids)
        return s, n

    def token_ids(prompt) -> bool:
        return isinstance(prompt, list) and len(prompt) > 0 and all(type(t) is int for t in prompt)

    def prompts_of(body: dict) -> tuple[list[list[int]], list[str]]:
        """A legacy completions request's prompts as token ids, with their text (for echo): as OpenAI and vLLM
        do, a string, a list of strings, a list of token ids, or a list of token-id lists."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or token_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"\"prompt\" must be a non-empty string, a list of token ids, or a list of up to "
                                f"{MAX_PROMPTS} strings or token-id lists", param="prompt")
        ids, texts = [], []
        vocab = engine.model.config.vocab_size
        for i, one in enumerate(prompt):
            if token_ids(one):  # OpenAI's "array of tokens" form: the ids are used as given
                bad = next((t for t in one if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ApiError(400, f"token id {bad} in \"prompt\"[{i}] is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                ids.append(list(one))
                texts.append(tokenizer.decode(one))
            elif isinstance(one, str) and one:
                ids.append(tokenizer.encode(one))
                texts.append(one)
            else:
                raise ApiError(400, f"\"prompt\"[{i}] must be a non-empty string or a non-empty list of token ids",
                               param="prompt")
            if not ids[-1]:
                raise ApiError(400, f"\"prompt\"[{i}] encodes to no tokens", param="prompt")
        return ids, texts

    def chat_messages(body: dict) -> tuple[list[dict], list[str]]:
        """The conversation with text content, and the data URLs of its images in order. OpenAI's content parts
        ({"type": "text", "text"} / {"type": "image_url", "image_url": {"url"}}) are joined; each image becomes the
        model's placeholder where it stood."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "\"messages\" must be a non-empty list of {role, content}", param="messages")
        out, urls = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), (str, list)):
                raise ApiError(400, f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string "
                                    "or list of parts}", param="messages")
            content = m["content"]
            if isinstance(content, list):
                text = ""
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        text += part["text"]
                    elif kind == "image_url":
                        url = part.get("image_url")
                        url = url.get("url") if isinstance(url, dict) else url
                        if not isinstance(url, str):
                            raise ApiError(400, f"messages[{i}].content[{j}]: image_url needs {{\"url\": ...}}",
                                           param="messages")
                        if vision is None:
                            raise ApiError(400, f"messages[{i}].content[{j}]: this model reads text only; images "
                                                "need a vision-language model", param="messages")
                        if not url.startswith("data:") and not (allow_image_urls
                                                                and url.startswith(("http://", "https://"))):
                            raise ApiError(400, f"messages[{i}].content[{j}]: remote image URLs are not fetched "
                                                "(the server's --allow_image_urls would); send the image inline as "
                                                "a data: URL (data:image/png;base64,...)", param="messages")
                        urls.append(url)
                        text += IMAGE_TOKEN + "\n" if vision.mode == "llava" else ""  # the adapter way: not in the text
                    else:
                        raise ApiError(400, f"messages[{i}].content[{j}] must be a text or image_url part",
                                       param="messages")
                content = text
            out.append({"role": m["role"], "content": content})
        if len(urls) > MAX_IMAGES:
            raise ApiError(400, f"{len(urls)} images in one request; at most {MAX_IMAGES}", param="messages")
        return out, urls

    def chat_prompt(messages: list[dict], urls: list[str]) -> list[int]:
        try:
            if vision is not None:
                from mightylm.multimodal.generate import prompt_ids

                return prompt_ids(vision, tokenizer, "", len(urls), messages=messages)
            return tokenizer.encode_chat(messages)
        except MightyError as e:  # placeholders that do not match the images
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    def read_images(urls: list[str]) -> list:
        """The request's images (data URLs, or fetched with --allow_image_urls), opened and checked (in a thread:
        fetching may wait on the network)."""
        from mightylm.multimodal.images import decode_data_url, fetch_image_url, open_image

        try:
            return [open_image(decode_data_url(u) if u.startswith("data:") else fetch_image_url(u),
                               name=f"image {k + 1}") for k, u in enumerate(urls)]
        except MightyError as e:
            raise ApiError(400, str(e), param="messages") from None

    def encode_images(images: list) -> torch.Tensor:
        """Images as projected image tokens (N, T, dim), or for the multimodal LLaMA-Adapter as the one image's term
        for the prompts (1, 1, dim). Run by the engine between steps (engine.call): the encoder's OpenMP regions
        then start from the engine's thread like every other (serve/command.py, _on_engine_thread)."""
        with torch.inference_mode():
            features = vision.encode(vision.processor(images))
            return vision.project(features) if vision.mode == "llava" else visual_terms(vision, features)

    async def images_of(urls: list[str]) -> torch.Tensor | None:
        """The request's images encoded, None without images."""
        if not urls:
            return None
        images = await asyncio.to_thread(read_images, urls)
        return await asyncio.to_thread(engine.call, lambda: encode_images(images))

    def flag(body: dict, key: str) -> bool:
        value = body.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"\"{key}\" must be true or false", param=key)
        return value

    async def generate(request: Request, path: str):
        body = await body_of(request, path)
        adapter = await adapter_of(body, request)
        if path == "/v1/chat/completions":  # a chat's image parts: placeholders in the prompt, pixels to encode
            messages, urls = chat_messages(body)
            prompts, texts = [chat_prompt(messages, urls)], [""]
        else:
            prompts, texts, urls = *prompts_of(body), []
        images = await images_of(urls)
        echo, logprobs = flag(body, "echo"), body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise ApiError(400, f"\"logprobs\" must be an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}",
                           param="logprobs")
        if echo and body.get("max_tokens") == 0:
            return await score(body, adapter, prompts, texts, logprobs)
        longest = max(len(p) for p in prompts) + bank.prefix_len(adapter)
        s, n = sampling_of(body, longest)
        stream, ignore_eos = flag(body, "stream"), flag(body, "ignore_eos")
        speculative = body.get("speculative", True)
        if not isinstance(speculative, bool):
            raise ApiError(400, "\"speculative\" must be true or false", param="speculative")
        history = history_of(request, body)
        if stream and logprobs is not None:
            raise ApiError(400, "\"logprobs\" is supported without streaming only (stream: false)", param="logprobs")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "\"stream_options\" must be {\"include_usage\": true|false}", param="stream_options")
        echoed = [text if echo else "" for text in texts]
        prompt_scores = None
        if echo and logprobs is not None:  # the prompt's own entries come first, as OpenAI's echo gives them
            prompt_scores = [await asyncio.to_thread(engine.score, p, adapter, logprobs) for p in prompts]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs, total = [], len(prompts) * n
        try:
            for i in range(total):  # choice i: prompt i // n, its sample i % n (OpenAI's order)
                seed = None if s.seed is None else s.seed + i % n
                settings = Sampling(**{**s.__dict__, "seed": seed})
                emit = (lambda i: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))(i)
                seqs.append(engine.submit(Sequence(prompts[i // n], settings, emit, adapter=adapter,
                                                   ignore_eos=ignore_eos, logprobs=logprobs,
                                                   speculative=speculative, history=history,
                                                   **{image_field: images})))
        except QueueFull as e:
            for seq in seqs:
                seq.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            for seq in seqs:
                seq.cancel()
            raise ApiError(400, str(e), param="max_tokens") from None
        chat = path == "/v1/chat/completions"
        user = getattr(request.state, "user", None)

        def log_turn(reply: str) -> None:  # a user's conversation, if they opted in
            if chat and personal is not None and user is not None:
                personal.log(user, body["messages"], reply, body["model"])

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body["model"]
        kind = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(p) for p in prompts)

        def chunk(i, text=None, finish=None, first=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish}
            return {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": model,
                    "choices": [choice]}

        drafted, accepted = [0] * total, [0] * total  # per choice, from its "done" event

        def usage_of(completion_tokens: int) -> dict:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            if engine.draft is not None:  # our extension: how speculation went for this request
                usage["speculative"] = {"drafted_tokens": sum(drafted), "accepted_tokens": sum(accepted),
                                        "acceptance_rate": round(sum(accepted) / max(sum(drafted), 1), 4)}
            return usage

        if stream:
            async def sse():
                done, generated, first = 0, 0, ""
                try:
                    for i in range(total):
                        if chat:
                            yield f"data: {json.dumps(chunk(i, first=True))}\n\n"
                        elif echoed[i // n]:
                            yield f"data: {json.dumps(chunk(i, echoed[i // n]))}\n\n"
                    while done < total:
                        i, ev = await events.get()
                        if ev["type"] == "text":
                            first += ev["text"] if i == 0 else ""
                            yield f"data: {json.dumps(chunk(i, ev['text']))}\n\n"
                        else:
                            done += 1
                            generated += ev["completion_tokens"]
                            drafted[i], accepted[i] = ev.get("drafted", 0), ev.get("accepted", 0)
                            if ev.get("error"):
                                yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                            yield f"data: {json.dumps(chunk(i, finish=_reason(ev)))}\n\n"
                    if options.get("include_usage"):  # OpenAI's last chunk: no choices, the request's usage
                        last = {**chunk(0), "choices": [], "usage": usage_of(generated)}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    await asyncio.to_thread(log_turn, first)
                finally:  # the client went away, or we are done: free the rows either way
                    for seq in seqs:
                        seq.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts_out, reasons, usage, scores = [echoed[i // n] for i in range(total)], [None] * total, [0] * total, \
            [None] * total
        done = 0
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while done < total:
                if gone.done():  # nobody will read the answer: stop generating it
                    return Response(status_code=499)
                try:
                    i, ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    continue
                if ev["type"] == "text":
                    texts_out[i] += ev["text"]
                else:
                    done += 1
                    if ev.get("error"):
                        raise ApiError(500, f"generation failed: {ev['error']}", "server_error")
                    reasons[i], usage[i], scores[i] = _reason(ev), ev["completion_tokens"], ev.get("logprobs")
                    drafted[i], accepted[i] = ev.get("drafted", 0), ev.get("accepted", 0)
        finally:
            gone.cancel()
            for seq in seqs:
                seq.cancel()

        def logprobs_of(i: int) -> dict | None:
            if logprobs is None:
                return None
            head = prompt_scores[i // n] if prompt_scores else None
            start = len(echoed[i // n]) if echo else 0
            scored = scores[i] or []
            tail = logprob_entries(tokenizer, [t for t, _, _ in scored], [v for _, v, _ in scored],
                                   [best for _, _, best in scored] if logprobs else None, start)
            return _merge(head, tail)

        await asyncio.to_thread(log_turn, texts_out[0])
        choices = [({"index": i, "message": {"role": "assistant", "content": texts_out[i]}, "finish_reason": reasons[i]}
                    if chat else {"index": i, "text": texts_out[i], "finish_reason": reasons[i],
                                  "logprobs": logprobs_of(i)})
                   for i in range(total)]
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
                "usage": usage_of(sum(usage))}

    async def score(body: dict, adapter: int, prompts: list[list[int]], texts: list[str], logprobs: int | None):
        """echo + max_tokens 0: each prompt back with its tokens' log-probabilities (no generation)."""
        if body.get("stream") or body.get("n", 1) != 1:
            raise ApiError(400, "scoring a prompt (echo with max_tokens 0) takes neither stream nor n > 1")
        for p in prompts:
            if len(p) + bank.prefix_len(adapter) > engine.max_len:
                raise ApiError(400, f"the prompt has {len(p)} tokens; the context holds {engine.max_len}",
                               param="prompt")
        choices = []
        for i, (p, text) in enumerate(zip(prompts, texts)):
            scored = await asyncio.to_thread(engine.score, p, adapter, logprobs or 0)
            choices.append({"index": i, "text": text, "finish_reason": "length",
                            "logprobs": scored if logprobs is not None else None})
        used = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": 0, "total_tokens": used}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request):
        shared = [a for a in bank.ids if personal is None or a not in personal.loaded]
        names = [name] + [f"{name}:{a}" for a in shared]
        if personal is not None:
            names += await asyncio.to_thread(personal.visible_models, request.state.user, name)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mightylm"}
                                           for m in names]}

    def admin_only(request: Request) -> None:
        if personal is not None and not request.state.user.admin:
            raise ApiError(403, "loading adapters from server paths is for admin keys; users manage their own adapters "
                                "under /admin/registry", "permission_error")

    @app.get("/admin/adapters")
    async def adapters(request: Request):
        admin_only(request)
        return {"adapters": [{"name": a, "kind": bank.kinds[a], "model": f"{name}:{a}"} for a in bank.ids]}

    @app.post("/admin/adapters")
    async def add_adapter(request: Request):
        admin_only(request)
        body = await body_of(request, "/admin/adapters")
        if not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, "send {\"name\": string, \"path\": adapter directory on the server}")
        from mightylm.adapters import AdapterError

        path = Path(body["path"])
        if not (path / "adapter_config.json").is_file():  # one answer whether the directory exists or not
            raise ApiError(400, f"{body['path']}: no such adapter directory on the server (one holding "
                                "adapter_config.json and adapter_model.safetensors)", param="path")
        try:  # files are read off the engine thread (a slow disk must not stall generation); the swap is quick
            prepared = await asyncio.to_thread(bank.prepare, body["name"], path)
            what = await asyncio.to_thread(engine.call, lambda: bank.install(prepared))
        except AdapterError as e:
            raise ApiError(400, str(e)) from None
        return {"name": body["name"], "model": f"{name}:{body['name']}", "loaded": what}

    @app.delete("/admin/adapters/{adapter}")
    async def remove_adapter(adapter: str, request: Request):
        admin_only(request)
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

    if personal is not None:
        registry = personal.registry

        def version_of(value) -> int | None:
            if value is None:
                return None
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ApiError(400, f"\"version\" must be an integer, got {value!r}", param="version") from None

        @app.get("/admin/registry/adapters")
        async def registry_list(request: Request, owner: str | None = None):
            records = await registry_call(registry.list, request.state.user, owner=owner)
            return {"adapters": [r.public() for r in records]}

        @app.get("/admin/registry/adapters/{adapter}")
        async def registry_show(adapter: str, request: Request, owner: str | None = None, version: str | None = None):
            record = await registry_call(registry.show, request.state.user, adapter, owner=owner,
                                         version=version_of(version))
            return record.public()

        @app.post("/admin/registry/adapters/{adapter}/promote")
        async def registry_promote(adapter: str, request: Request):
            body = await body_of(request, "promote")
            record = await registry_call(registry.promote, request.state.user, adapter, version_of(body.get("version")),
                                         owner=body.get("owner"))
            return record.public()

        @app.post("/admin/registry/adapters/{adapter}/rollback")
        async def registry_rollback(adapter: str, request: Request):
            body = await body_of(request, "rollback")
            return (await registry_call(registry.rollback, request.state.user, adapter, owner=body.get("owner"))).public()

        @app.delete("/admin/registry/adapters/{adapter}")
        async def registry_delete(adapter: str, request: Request, owner: str | None = None, version: str | None = None):
            versions = await registry_call(registry.delete, request.state.user, adapter, owner=owner,
                                           version=version_of(version))
            await asyncio.to_thread(engine.call, lambda: personal.unload(owner or request.state.user.name, adapter))
            return {"name": adapter, "deleted_versions": versions}

        @app.delete("/admin/registry/users/{user}")
        async def registry_forget(user: str, request: Request):
            gone = await registry_call(registry.forget_user, request.state.user, user)
            await asyncio.to_thread(engine.call, lambda: personal.unload(user))
            histories.pop(f"user {user}", None)  # their answers' counts too
            return {"forgotten": gone}

        @app.put("/admin/registry/users/{user}/logging")
        async def registry_logging(user: str, request: Request):
            body = await body_of(request, "logging")
            if not isinstance(body.get("enabled"), bool):
                raise ApiError(400, "send {\"enabled\": true|false}", param="enabled")
            await registry_call(registry.set_logging, request.state.user, user, body["enabled"])
            return {"user": user, "log_conversations": body["enabled"]}

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


def _merge(head: dict | None, tail: dict) -> dict:
    """The prompt's entries (echo), then the generated tokens' (both have alternatives, or neither)."""
    if head is None:
        return tail
    return {key: None if head[key] is None else head[key] + tail[key] for key in tail}


def _reason(event: dict) -> str:
    return "length" if event["finish_reason"] == "length" else "stop"


def render_metrics(engine: Engine) -> str:
    s, load = engine.stats, engine.load()
    lines = ["# TYPE mightylm_requests_total counter", f"mightylm_requests_total {s['requests']}",
             "# TYPE mightylm_prompt_tokens_total counter", f"mightylm_prompt_tokens_total {s['prompt_tokens']}",
             "# TYPE mightylm_generated_tokens_total counter",
             f"mightylm_generated_tokens_total {s['generated_tokens']}",
             "# TYPE mightylm_prefill_passes_total counter", f"mightylm_prefill_passes_total {s['prefill_passes']}",
             "# TYPE mightylm_speculative_passes_total counter",
             f"mightylm_speculative_passes_total {s['speculative_passes']}",
             "# TYPE mightylm_draft_tokens_total counter", f"mightylm_draft_tokens_total {s['drafted_tokens']}",
             "# TYPE mightylm_accepted_draft_tokens_total counter",
             f"mightylm_accepted_draft_tokens_total {s['accepted_tokens']}",
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
