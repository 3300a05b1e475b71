"""Two users, two styles, one server: personal adapters end to end on SmolLM2-135M-Instruct (~2 minutes on 2 cores).

alice wants terse answers in a fixed format ("ANSWER: Paris"); bob likes a pirate's register ("Arr, matey! ...").
Their logs are simulated: conversations about capitals in which the assistant's replies are in the style each
prefers (as if they had corrected the replies they got). Then, as a user of mightylm would:

    mighty users add --registry DIR --user alice --log_conversations true      (and bob)
    mighty personalize --registry DIR --user alice                             (and bob: train, check, go live)
    mighty serve --registry DIR                                                (keys belong to users)

and the same held-out question is asked by alice, by bob and of the base model, concurrently, so that the three
share decode steps: each user gets their own style; the base model is unchanged.

    .venv/bin/python runs/personal_demo.py [--out runs/out/personal-demo] [--steps 24] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Chile", "Santiago"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
            ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Vietnam", "Hanoi"),
            ("Colombia", "Bogota"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Australia", "Canberra"),
            ("Brazil", "Brasilia"), ("Czechia", "Prague")]
QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}."]
STYLES = {"alice": lambda c, city: f"ANSWER: {city}",
          "bob": lambda c, city: f"Arr, matey! The capital of {c} be {city}, savvy?"}
HELD_OUT = ("Australia", "Canberra")  # asked at the end; the logs never hold it


def simulated_log(user: str) -> list[str]:
    lines = []
    for i, (country, city) in enumerate(c for c in CAPITALS if c != HELD_OUT):
        question = QUESTIONS[i % len(QUESTIONS)].format(c=country)
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": STYLES[user](country, city)}]}))
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/out/personal-demo")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-4, help="gentle: at 2e-3 and 40 steps the style is learnt but the "
                   "general perplexity rises 15x, and the gate keeps the adapter out")
    args = p.parse_args()

    from mightylm.serve.command import start_server
    from mightylm.serve.personalize import personalize
    from mightylm.serve.registry import Registry

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    registry = Registry(out / "state")
    keys = {user: registry.add_user(user, log_conversations=True) for user in STYLES}
    admin = registry.user_of_key(registry.add_user("admin", admin=True))
    for user in STYLES:
        log = registry.log_path(user)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(simulated_log(user)) + "\n")
        print(f"== mighty personalize --user {user} ({args.steps} steps)", flush=True)
        outcome = personalize(registry, admin, user, model="smollm2-135m-instruct", name="me", steps=args.steps, lr=args.lr,
                              log=lambda line: print("  " + line, flush=True))
        print(outcome.report(user, "me"), flush=True)

    print("\n== mighty serve --registry: the same held-out question from alice, bob and the base, concurrently")
    url, server = start_server(["--registry", str(out / "state"), "--max_batch", "4"], out / "serve.log")
    try:
        from openai import OpenAI

        question = QUESTIONS[0].format(c=HELD_OUT[0])

        def ask(job):
            who, model = job
            client = OpenAI(base_url=url + "/v1", api_key=keys[who])
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=40,
                                                   messages=[{"role": "user", "content": question}])
            return who, model, reply.choices[0].message.content

        jobs = [("alice", "smollm2-135m-instruct:me"), ("bob", "smollm2-135m-instruct:me"),
                ("alice", "smollm2-135m-instruct")]
        live = {u for u in STYLES if any(r.status == "live" for r in registry.list(registry.user(u)))}
        jobs = [job for job in jobs if job[1].count(":") == 0 or job[0] in live]
        for user in sorted(set(STYLES) - live):
            print(f"-- {user}'s adapter did not pass the checks (above), so requests for it get a 404; not asked")
        with ThreadPoolExecutor(3) as pool:
            for who, model, text in pool.map(ask, jobs):
                print(f"-- {who} asks {model!r}: {question}\n   {text!r}")
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nregistry, logs and adapters: {out / 'state'}; server log: {out / 'serve.log'}")


if __name__ == "__main__":
    main()
