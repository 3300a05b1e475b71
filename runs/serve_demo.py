"""The tour's last step: start `mighty serve` on the embedded model with the LoRA adapter trained in step 5,
ask it the same question through the base model and through the adapter with the official `openai`
client (once streamed), then stop the server and print how to start it again and open the chat page.

    .venv/bin/python runs/serve_demo.py --adapter runs/out/lora-demo/adapter
"""

from __future__ import annotations

import argparse
import sys
import time

MODEL = "smollm2-135m-instruct"
QUESTION = "Add the two numbers. Answer with the result only.\n\n57 + 38"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the LoRA adapter directory to serve as MODEL:add")
    parser.add_argument("--log", default="runs/out/serve-demo.log", help="where the server's output goes")
    args = parser.parse_args()

    import openai

    from mightylm.serve.command import start_server

    try:
        url, server = start_server(["--model", MODEL, "--adapter", f"add={args.adapter}"], args.log)
    except RuntimeError as e:
        sys.exit(str(e))
    print("$ mighty " + " ".join(server.args[1:]))
    try:
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
