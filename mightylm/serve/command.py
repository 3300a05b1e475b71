"""`mighty serve`: load a model, start the engine, and serve the HTTP API with uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from mightylm.options import Port, PositiveInt


def serve(
    model: str = "smollm2-135m-instruct",
    host: str = "127.0.0.1",
    port: Port = 8000,
    adapter: list[str] | None = None,
    api_key: list[str] | None = None,
    name: str | None = None,
    max_batch: PositiveInt = 16,
    max_queue: PositiveInt = 64,
    max_len: PositiveInt = 2048,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

    Requests are batched continuously (new ones join between decode steps). A request picks an adapter
    with "model": "NAME:ADAPTER"; adapters load at start (--adapter NAME=DIR, repeatable) or at run time
    (POST /admin/adapters {"name", "path"}), and requests for different adapters share a batch.

    Args:
        model: A Hugging Face model directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        host: The address to listen on; the default accepts connections from this machine only.
        port: The port to listen on.
        adapter: NAME=DIR: a LoRA, prompt-tuning or P-tuning adapter served as "MODEL:NAME" (repeat for several).
        api_key: Accept only requests with "Authorization: Bearer KEY" (repeat for several keys).
        name: The model name clients send (default: the model directory's name or the embedded name).
        max_batch: Sequences decoded together (rows of the KV-cache pool).
        max_queue: Requests that may wait; beyond it clients get 429 with Retry-After.
        max_len: Tokens per sequence (prompt + completion), at most the model's context.
        dtype: Weight and activation precision (float32, bfloat16, float16).
    """
    import uvicorn

    import mightylm
    from mightylm.adapters import AdapterError
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine

    served = name or Path(model.rstrip("/")).name.removesuffix(".gguf")
    if ":" in served:
        raise ValueError(f"model name {served!r} may not contain ':' (it separates the adapter); pass --name")
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    net, tokenizer = mightylm.load(model, dtype=dtype, need_tokenizer=True)
    bank = AdapterBank(net.eval())
    for spec in adapter or []:
        adapter_name, eq, path = spec.partition("=")
        if not eq:
            raise AdapterError(f"--adapter {spec!r}: use NAME=DIR")
        print(f"adapter {adapter_name}: {bank.add(adapter_name, path)}", file=sys.stderr)
    engine = Engine(net, tokenizer, bank, max_batch=max_batch, max_queue=max_queue, max_len=max_len).start()
    app = create_app(engine, served, api_keys=tuple(api_key or ()))
    print(f"serving {served} at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


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
