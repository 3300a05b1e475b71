"""The tour's last step: start `mighty serve` on the embedded model with the LoRA adapter trained in step 5,
ask it the same question through the base model and through the adapter with the official `openai`
client (once streamed), then stop the server and print how to start it again and open the chat page.

    .venv/bin/python runs/serve_demo.py --adapter runs/out/lora-demo/adapter
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = "smollm2-135m-instruct"
QUESTION = "Add the two numbers. Answer with the result only.\n\n57 + 38"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}; its log ({log}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit(f"the server did not answer /health within {timeout:.0f} s; its log ({log}):\n{log.read_text()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the LoRA adapter directory to serve as MODEL:add")
    parser.add_argument("--log", default="runs/out/serve-demo.log", help="where the server's output goes")
    args = parser.parse_args()

    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.log)
    mighty = Path(sys.executable).with_name("mighty")
    command = [str(mighty), "serve", "--model", MODEL, "--adapter", f"add={args.adapter}", "--port", str(port)]
    print("$ mighty " + " ".join(command[1:]))
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        print("models:", ", ".join(m.id for m in client.models.list()))
        messages = [{"role": "user", "content": QUESTION}]
        for model in (MODEL, f"{MODEL}:add"):
            start = time.perf_counter()
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            print(f"{model:>28}: {reply.choices[0].message.content!r}  ({reply.usage.completion_tokens} tokens, "
                  f"{time.perf_counter() - start:.2f} s)")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=f"{MODEL}:add", messages=messages, max_tokens=16, temperature=0, stream=True)]
        print(f"{'streamed, ' + MODEL + ':add':>28}: {[p for p in pieces if p]}")
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nTo chat in a browser, start the server and open http://127.0.0.1:8000/ (pick '{MODEL}:add' to "
          f"use the adapter):\n  .venv/bin/mighty serve --model {MODEL} --adapter add={args.adapter}")


if __name__ == "__main__":
    main()
