"""Personal adapters in the server (`mighty serve --registry`): each user's "tiny:NAME" is their own adapter, a
mixed batch equals PEFT's multi-adapter generate, refusals over HTTP leak nothing, the loaded set stays under its
budget (LRU, pinning), promotions and rollbacks take effect on the next request, and "forget me" works."""

import copy
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mightylm
from mightylm.adapters.files import base_fingerprint, stamp_base
from mightylm.adapters.lora import apply_lora, save_lora
from mightylm.serve.registry import Registry

from conftest import make_hf_model, run_app

PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def world(bpe_tokenizer, tmp_path_factory):
    """A tiny llama (transformers and ours), three LoRA adapters on it, and a registry: alice and bob each own an
    adapter named "style" (different weights), alice also "terse"; root is an admin."""
    root = tmp_path_factory.mktemp("personal")
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    hf.save_pretrained(root / "base")
    bpe_tokenizer.save(root / "base")
    model, _ = mightylm.load(root / "base")
    for i, name in enumerate(("alice-style", "bob-style", "alice-terse")):
        adapted = copy.deepcopy(model)
        apply_lora(adapted, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p, value in adapted.named_parameters():
                if "lora_B" in p:
                    value.normal_(0, 0.5)  # large enough to change greedy tokens of a random tiny model
        save_lora(adapted, root / name, base_model=str(root / "base"))
        stamp_base(model, root / name)
    return hf, model, bpe_tokenizer, root


def make_registry(world, path):
    _, model, _, root = world
    registry = Registry(path)
    keys = {u: registry.add_user(u, admin=u == "root", log_conversations=u == "alice") for u in ("alice", "bob", "root")}
    users = {u: registry.user_of_key(k) for u, k in keys.items()}
    fp = base_fingerprint(model)
    for owner, name, source in (("alice", "style", "alice-style"), ("bob", "style", "bob-style"),
                                ("alice", "terse", "alice-terse")):
        registry.register(users[owner], name, root / source, fp)
        registry.promote(users[owner], name, 1)
    return registry, keys, users


@pytest.fixture
def served(world, tmp_path):
    """A server over a fresh registry (see make_registry): (server, registry, keys, users); `served.make(**args)`
    starts one with other PersonalAdapters settings instead."""
    started = []

    def make(**personal_args):
        _, model, tokenizer, _ = world
        registry, keys, users = make_registry(world, tmp_path)
        started.append(Server(model, tokenizer, registry, **personal_args))
        return started[-1], registry, keys, users

    yield make
    for server in started:
        server.close()


class Server:
    def __init__(self, model, tokenizer, registry, **personal_args):
        from mightylm.serve.adapters import AdapterBank
        from mightylm.serve.app import create_app
        from mightylm.serve.engine import Engine
        from mightylm.serve.personal import PersonalAdapters

        bank = AdapterBank(copy.deepcopy(model).eval())
        self.engine = Engine(bank.model, tokenizer, bank, max_batch=8, max_len=128).start()
        self.personal = PersonalAdapters(registry, self.engine, **personal_args)
        self.url, self._stop = run_app(create_app(self.engine, "tiny", personal=self.personal))

    def close(self):
        self._stop()
        self.engine.stop()

    def call(self, method, path, key, body=None):
        request = urllib.request.Request(self.url + path, method=method, data=None if body is None else
                                         json.dumps(body).encode(), headers={"Content-Type": "application/json",
                                                                             **({"Authorization": f"Bearer {key}"}
                                                                                if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def complete(self, key, model, prompt, max_tokens=8):
        return self.call("POST", "/v1/completions", key, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})


def test_a_mixed_batch_of_two_users_adapters_and_the_base_equals_peft(served, world):
    from peft import PeftModel

    hf, _, tokenizer, root = world
    server, _, keys, _ = served()
    ids = tokenizer.encode(PROMPT)
    jobs = [(keys["alice"], "tiny:style"), (keys["bob"], "tiny:style"), (keys["alice"], "tiny")]
    with ThreadPoolExecutor(3) as pool:  # concurrent: they share decode steps
        answers = list(pool.map(lambda job: server.complete(job[0], job[1], ids, 8), jobs))
    assert all(status == 200 for status, _ in answers), answers
    ours = [tokenizer.encode(a["choices"][0]["text"], add_special_tokens=False) for _, a in answers]
    peft = PeftModel.from_pretrained(hf, str(root / "alice-style"), adapter_name="alice").eval()
    peft.load_adapter(str(root / "bob-style"), adapter_name="bob")
    with torch.no_grad():
        out = peft.generate(torch.tensor([ids] * 3), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                            adapter_names=["alice", "bob", "__base__"])
    expected = [tokenizer.decode(row[len(ids):].tolist()) for row in out]
    assert [a["choices"][0]["text"] for _, a in answers] == expected
    assert len({tuple(o) for o in ours}) == 3  # the two adapters and the base really differ
    assert server.personal.stats["loads"] == 2


def test_refusals_over_http_leak_nothing_and_each_user_manages_their_own(served):
    server, registry, keys, users = served()
    bob, alice, root = keys["bob"], keys["alice"], keys["root"]
    status, real = server.complete(bob, "tiny:terse", "To be")  # alice's only
    _, ghost = server.complete(bob, "tiny:ghost", "To be")
    assert status == 404 and real["error"]["message"] == ghost["error"]["message"].replace("ghost", "terse")
    assert server.complete(None, "tiny", "To be")[0] == 401
    assert server.complete("mk-not-a-key", "tiny", "To be")[0] == 401
    models = server.call("GET", "/v1/models", bob)[1]["data"]
    assert [m["id"] for m in models] == ["tiny", "tiny:style"]
    listed = server.call("GET", "/admin/registry/adapters", bob)[1]["adapters"]
    assert [(a["owner"], a["name"]) for a in listed] == [("bob", "style")]
    for method, path, body in (("GET", "/admin/registry/adapters/terse?owner=alice", None),
                               ("DELETE", "/admin/registry/adapters/terse?owner=alice", None),
                               ("POST", "/admin/registry/adapters/terse/promote", {"version": 1, "owner": "alice"}),
                               ("POST", "/admin/registry/adapters/terse/rollback", {"owner": "alice"}),
                               ("DELETE", "/admin/registry/users/alice", None)):
        status, answer = server.call(method, path, bob, body)
        assert status == 404, (method, path, answer)
        assert "alice" not in answer["error"]["message"] or path.endswith("users/alice")
    assert server.call("POST", "/admin/adapters", bob, {"name": "x", "path": "/etc"})[0] == 403
    assert server.call("GET", "/admin/adapters", root)[0] == 200  # an admin may
    assert len(server.call("GET", "/admin/registry/adapters", root)[1]["adapters"]) == 3
    assert server.complete(alice, "tiny:terse", "To be")[0] == 200  # and the owner uses it


def test_promotion_and_rollback_take_effect_on_the_next_request(served, world):
    _, model, _, root = world
    server, registry, keys, users = served()
    registry.register(users["alice"], "style", root / "alice-terse", base_fingerprint(model))  # v2: other weights
    alice = keys["alice"]
    first = server.complete(alice, "tiny:style", "To be")[1]["choices"][0]["text"]
    status, record = server.call("POST", "/admin/registry/adapters/style/promote", alice, {"version": 2})
    assert status == 200 and record["status"] == "live"
    second = server.complete(alice, "tiny:style", "To be")[1]["choices"][0]["text"]
    terse = server.complete(alice, "tiny:terse", "To be")[1]["choices"][0]["text"]  # the same weights as v2
    assert second == terse != first
    assert server.call("POST", "/admin/registry/adapters/style/rollback", alice, {})[1]["version"] == 1
    assert server.complete(alice, "tiny:style", "To be")[1]["choices"][0]["text"] == first


def test_the_loaded_set_stays_under_its_budget_least_recently_used_first_pinned_never(served):
    one = 2 * 4 * (64 + 64) * 2 * 4 + 2 * 4 * (96 + 64) * 4  # bytes of one adapter: A and B of q, v, down per layer
    server, registry, keys, users = served(budget_bytes=int(one * 1.5), pinned=("alice/terse",))
    alice, bob = keys["alice"], keys["bob"]
    assert server.complete(alice, "tiny:style", "To be")[0] == 200
    assert server.complete(bob, "tiny:style", "To be")[0] == 200  # alice's is evicted to make room
    assert list(server.personal.loaded) == ["bob.style.v1"] and server.personal.stats["evictions"] == 1
    assert server.complete(alice, "tiny:terse", "To be")[0] == 200  # pinned, evicting bob's
    status, answer = server.complete(alice, "tiny:style", "To be")  # no room beside the pinned one
    assert status == 503 and "pinned or busy" in answer["error"]["message"]
    assert list(server.personal.loaded) == ["alice.terse.v1"]


def test_opted_in_conversations_are_logged_and_forgetting_a_user_removes_everything(served, tmp_path):
    server, registry, keys, users = served()
    chat = {"model": "tiny:style", "messages": [{"role": "user", "content": "alice-only words"}], "max_tokens": 4}
    for who in ("alice", "bob"):
        assert server.call("POST", "/v1/chat/completions", keys[who], chat)[0] == 200
    log = registry.log_path("alice")
    turn = json.loads(log.read_text().splitlines()[0])
    assert turn["messages"][0]["content"] == "alice-only words" and turn["messages"][1]["role"] == "assistant"
    assert not registry.log_path("bob").exists()  # bob did not opt in
    status, answer = server.call("DELETE", "/admin/registry/users/alice", keys["alice"])
    assert status == 200 and answer["forgotten"]["adapters"] == 2
    assert server.complete(keys["alice"], "tiny", "To be")[0] == 401
    assert not [p for p in tmp_path.rglob("*") if "alice" in str(p.relative_to(tmp_path))]
    assert all(b"alice" not in f.read_bytes() for f in tmp_path.glob("registry.db*"))
    assert not [n for n in server.personal.loaded if n.startswith("alice.")]
    assert server.complete(keys["bob"], "tiny:style", "To be")[0] == 200
