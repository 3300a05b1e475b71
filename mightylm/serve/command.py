"""`mighty serve`: load a model, start the engine, and serve the HTTP API with uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from mightylm.options import Port, PositiveFloat, PositiveInt


API_KEY_ENV = "MIGHTY_API_KEY"


def serve(
    model: str = "smollm2-135m-instruct",
    host: str = "127.0.0.1",
    port: Port = 8000,
    adapter: list[str] | None = None,
    api_key: list[str] | None = None,
    api_key_file: str | None = None,
    name: str | None = None,
    max_batch: PositiveInt = 16,
    max_queue: PositiveInt = 64,
    max_len: PositiveInt = 2048,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    drain_timeout: PositiveFloat = 10.0,
    blocks: bool = True,
    int8_activations: bool = False,
    draft: str | None = None,
    gamma: PositiveInt = 4,
    lookup_history: bool = False,
    rope_scaling: str | None = None,
    prefill_chunk: PositiveInt = 512,
    registry: str | None = None,
    registry_db: str | None = None,
    adapter_budget_mb: PositiveInt = 256,
    pin: list[str] | None = None,
    allow_image_urls: bool = False,
    device: str = "cpu",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

    Requests are batched continuously (new ones join between decode steps). A request picks an adapter
    with "model": "NAME:ADAPTER"; adapters load at start (--adapter NAME=DIR, repeatable) or at run time
    (POST /admin/adapters {"name", "path"}), and requests for different adapters share a batch.
    API keys are best given in the environment (MIGHTY_API_KEY, several separated by commas) or a file
    (--api-key-file, one per line): a key on the command line is visible to every user of `ps`.
    SIGTERM or Ctrl-C stops accepting connections, lets running requests finish for up to --drain-timeout
    seconds, then ends the rest and exits.

    Args:
        model: A Hugging Face model directory, a .gguf file, or an embedded model name (smollm2-135m-instruct); a
            vision-language model (a LLaVA directory or a `mighty finetune vlm` run) takes images in chat messages
            as OpenAI image_url parts with data: URLs (http(s) URLs only with --allow_image_urls; at most 4 images of
            20 MiB; one for a multimodal LLaMA-Adapter, which conditions each request's rows on its own image).
        host: The address to listen on; the default accepts connections from this machine only.
        port: The port to listen on.
        adapter: NAME=DIR: a LoRA, prompt-tuning or P-tuning adapter served as "MODEL:NAME" (repeat for several).
        api_key: Accept only requests with "Authorization: Bearer KEY" (repeat for several keys). Prefer the
            MIGHTY_API_KEY environment variable or --api-key-file: the command line is visible to `ps`.
        api_key_file: A file with one API key per line (blank lines and lines starting with # are skipped).
        name: The model name clients send (default: the model directory's name or the embedded name).
        max_batch: Sequences decoded together (rows of the KV-cache pool).
        max_queue: Requests that may wait; beyond it clients get 429 with Retry-After.
        max_len: Tokens per sequence (prompt + completion), at most the model's context.
        dtype: Weight and activation precision (float32, bfloat16, float16).
        drain_timeout: Seconds that running requests get to finish after SIGTERM or Ctrl-C.
        blocks: Keep a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q6_K / F16 / BF16 projection and head weights as stored (float32
            only), a decode step of the whole batch in one native call; false dequantizes them at load.
        int8_activations: With --blocks: every token's activations (prompts' too) rounded to 8 bits per block of
            32 and its Q8_0 / Q4_0 / Q4_1 products taken in integers, as llama.cpp does, each request's rows as they
            would be alone (so as `mighty generate --int8_activations` gives them); not float32's result. Batches
            and prompts are several times faster so (bench/RESULTS.md).
        draft: Speculative decoding: prompt-lookup (or prompt-lookup:N, up to N tokens compared) or a smaller model
            sharing the vocabulary (a directory or .gguf). Each step verifies every row's drafted tokens in one
            pass and keeps exactly what the model itself would sample; a step speculates only when the measured
            pass times and acceptance say it gives more tokens per second. Requests opt out with
            "speculative": false; their usage reports drafted and accepted tokens.
        gamma: The most drafted tokens per row and step (with --draft).
        lookup_history: With --draft prompt-lookup: each user's earlier answers (per registry user or API key; per
            the request's "user" field on a server without keys), counted in memory, feed prompt lookup's drafts
            for that user's later requests, never anyone else's; forgotten at restart and with the user.
        rope_scaling: Another RoPE scaling for a longer context, TYPE:FACTOR with linear, dynamic or yarn (e.g.
            yarn:4), or none; --max_len may then grow to the new context.
        prefill_chunk: Prompts longer than this many tokens are prefilled in chunks between decode steps (each
            about half a decode step long while others are decoding, at most this many tokens), so that running
            streams keep flowing while a long prompt arrives.
        registry: A state directory of personal adapters (made by `mighty users add`, filled by `mighty adapters
            register`): API keys then belong to its users, "MODEL:NAME" is the asking user's adapter NAME (its
            live version, loaded on first use), and users manage their own adapters under /admin/registry.
        registry_db: With --registry: the records in this PostgreSQL database (postgresql://user@host/db; or the
            MIGHTY_REGISTRY_DB environment variable, which keeps a password off the command line), shared by several
            server processes; the adapter files stay under --registry, which they must all reach.
        adapter_budget_mb: With --registry: memory for loaded personal adapters; the least recently used are
            unloaded to make room (never pinned ones, nor one a request is using).
        pin: With --registry: OWNER/NAME adapters that stay loaded once used (repeatable).
        allow_image_urls: A vision-language model may be sent http(s) image URLs, which the server fetches (20 MiB
            and 10 s at most each). Off by default: the server would then reach whatever address a request names.
        device: cpu, or cuda (cuda:N) for an NVIDIA GPU: the weights dequantized to --dtype (bfloat16 is the fast
            one there) and moved there, the KV-cache pool too; each decode step runs the batch's rows, per-request
            adapters included, on the GPU. Not yet with --draft, --int8_activations or a vision-language model.
    """
    import os
    import signal

    import uvicorn

    import mightylm
    from mightylm.adapters import AdapterError
    from mightylm.compress.gguf_blocks import GGUFLinear
    from mightylm.compress.sparse24 import Sparse24Linear, pack_24_
    from mightylm.errors import UsageError
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import freeze_what_lives
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine, engine_on_its_thread

    served = name or Path(model.rstrip("/")).name.removesuffix(".gguf")
    if ":" in served:
        raise UsageError(f"model name {served!r} may not contain ':' (it separates the adapter); pass --name")
    keys = list(api_key or []) + [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if api_key_file:
        keys += [line.strip() for line in Path(api_key_file).read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise UsageError(f"--api-key-file {api_key_file}: holds no key (one per line)")
    if lookup_history and not (draft or "").startswith("prompt-lookup"):
        raise UsageError("--lookup_history feeds prompt lookup's drafts: add --draft prompt-lookup")
    if draft and draft.startswith("layers:"):  # before the slow load, like the port
        raise UsageError("--draft layers:N is for `mighty generate|chat`; the server takes prompt-lookup or a "
                         "draft model")
    from mightylm.generate import generation_device
    from mightylm.multimodal.checkpoint import is_vlm, load_vlm

    vlm = is_vlm(model)
    if allow_image_urls and not vlm:  # before the slow load, like the port
        raise UsageError("--allow_image_urls is for a vision-language model; this one reads text only")
    on_gpu = generation_device(device).type == "cuda"  # checked before the slow load: says what to do
    if on_gpu:
        refused = [flag for flag, given in (("--draft", draft), ("--int8_activations", int8_activations),
                                            ("a vision-language model", vlm)) if given]
        if refused:
            raise UsageError(f"--device {device}: {', '.join(refused)} not yet on a GPU (the server runs them on the "
                             "CPU)")
    sock = _listen(host, port)  # before the slow load: a port in use is said at once

    def build():  # loads and makes the engine on the thread that then runs its loop (engine_on_its_thread)
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        vision = None
        if vlm:  # a vision-language model: its decoder serves, its encoder turns images into tokens
            vision, tokenizer = load_vlm(model, dtype=dtype)  # (or, the adapter way in, into each row's prompt term)
            net = vision.language
        else:
            net, tokenizer = mightylm.load(model, dtype=dtype, need_tokenizer=True,
                                           keep_blocks=blocks and dtype == "float32" and not on_gpu)
        if rope_scaling:
            from mightylm.model import set_rope_scaling

            print(set_rope_scaling(net, rope_scaling), file=sys.stderr)
        if on_gpu:
            net.to(device)
        else:
            pack_24_(net)  # a 2:4-pruned model: its batches (up to 32 rows) read only the kept weights
        if int8_activations:
            from mightylm.compress.gguf_blocks import int8_activations_

            if not int8_activations_(net):
                print("--int8_activations: no Q8_0 / Q4_0 / Q4_1 blocks kept in this model; it changes nothing",
                      file=sys.stderr)
        elif not on_gpu:
            from mightylm.compress.gguf_blocks import float_layouts_

            float_layouts_(net)  # kept blocks laid out for float32 (kernels.float_arithmetic)
        if any(isinstance(m, (GGUFLinear, Sparse24Linear)) for m in net.modules()):
            # kept GGUF blocks or 2:4 weights are read once for all rows: a decode step of the batch runs every
            # block in one native call (the decode layout, fuse.py), LoRA rows included (AdapterBank.set_rows)
            fuse_projections_(net)
        bank = AdapterBank(net.eval())
        for spec in adapter or []:
            adapter_name, eq, path = spec.partition("=")
            if not eq:
                raise AdapterError(f"--adapter {spec!r}: use NAME=DIR")
            print(f"adapter {adapter_name}: {bank.add(adapter_name, path)}", file=sys.stderr)
        speculate = None
        if draft:
            from mightylm.speculative import make_draft

            speculate = make_draft(draft, net, load=lambda path: _load_draft(path, dtype, blocks))
            speculate = getattr(speculate, "model", speculate)  # the engine keeps a draft model's cache itself
            print(f"speculative decoding: {draft}, up to {gamma} drafted tokens per row and step"
                  + (", each user's earlier answers kept in memory as their lookup history" if lookup_history else ""),
                  file=sys.stderr)
        return Engine(net, tokenizer, bank, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                      draft=speculate, gamma=gamma, prefill_chunk=prefill_chunk, vision=vision)

    engine = engine_on_its_thread(build)
    pool = sum(t.numel() * t.element_size() for t in engine.pool.k + engine.pool.v)
    print(f"KV-cache pool: {max_batch} x {engine.max_len} tokens (--max_batch x --max_len), up to "
          f"{pool / 2**20:,.0f} MiB as it fills", file=sys.stderr)
    personal = None
    if registry:
        from mightylm.serve.personal import PersonalAdapters
        from mightylm.serve.registry import Registry

        if keys:
            raise UsageError("--registry gives every user their own API keys (mighty users add); drop --api-key, "
                             "--api-key-file and MIGHTY_API_KEY")
        url = registry_db or os.environ.get("MIGHTY_REGISTRY_DB") or None
        personal = PersonalAdapters(Registry(registry, url=url), engine, budget_bytes=adapter_budget_mb << 20,
                                    pinned=tuple(pin or ()))
        print(f"personal adapters from {registry}: {len(personal.registry.users())} users, budget "
              f"{adapter_budget_mb} MiB", file=sys.stderr)
    app = create_app(engine, served, api_keys=tuple(keys), personal=personal, allow_image_urls=allow_image_urls,
                     lookup_history=lookup_history)
    freeze_what_lives()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout))
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {served} at http://{shown}:{port}/v1 (chat page: http://{shown}:{port}/)"
          + (f"; {len(keys)} API key(s)" if keys else ""), file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM and then raises the signal again: this handler turns that into a plain exit
    # with the shell's status for SIGTERM (143), after the engine has stopped.
    signal.signal(signal.SIGTERM, _exit_143)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


def _load_draft(path: str, dtype: str, blocks: bool):
    import mightylm
    from mightylm.compress.sparse24 import pack_24_

    print(f"loading the draft {path} ...", file=sys.stderr, flush=True)
    model, _ = mightylm.load(path, dtype=dtype, keep_blocks=blocks and dtype == "float32")
    pack_24_(model)
    return model.eval()


def _exit_143(signum, frame):
    raise SystemExit(128 + signum)


def _listen(host: str, port: int):
    """A socket bound to host:port, or a UsageError saying why not (in use, no such address, not allowed)."""
    import socket

    from mightylm.errors import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                         + ("; another server uses that port: pass another --port" if e.errno == 98 else "")) from None
    sock.set_inheritable(True)
    return sock


def start_server(args: list[str], log: str | Path, timeout: float = 180.0):
    """Start `mighty serve ARGS --port P` in a process of its own on a free loopback port and wait until
    /health answers. Returns (base URL, the process); raises RuntimeError with the server's log when it
    exits or does not answer within `timeout` seconds. For scripts and benchmarks that need a real server."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("mighty")), "serve", *args, "--port", str(port)]
    log = Path(log)
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; its log ({log}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url, server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s; its log ({log}):\n{log.read_text()}")
