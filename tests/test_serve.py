"""The server on a tiny model: the official openai client, batched == alone, per-request adapters in one
batch, bad input, API keys, the bounded queue, disconnects, metrics."""

import copy
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mightylm.generate import Sampling, generate

from conftest import run_app


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer, tmp_path_factory):
    return served_model(bpe_tokenizer, tmp_path_factory.mktemp("adapters"))


def served_model(bpe_tokenizer, root: Path):
    """(a tiny random model, the tokenizer, a directory with a LoRA ("lora") and a soft prompt ("prompt") for it)."""
    from mightylm.adapters.lora import apply_lora, save_lora
    from mightylm.adapters.prompt import apply_prompt_tuning, save_prompt
    from mightylm.config import ModelConfig
    from mightylm.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=bpe_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                         max_seq_len=256)
    base = Transformer(config).eval()
    lora = copy.deepcopy(base)
    apply_lora(lora, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(lora, root / "lora")
    prompt = copy.deepcopy(base)
    apply_prompt_tuning(prompt, 5, init=torch.randn(5, config.dim))
    save_prompt(prompt, root / "prompt")
    return base, bpe_tokenizer, root


def _reference(model, tokenizer, adapter_dir, text, max_tokens):
    from mightylm.adapters import load_adapter

    net = copy.deepcopy(model)
    if adapter_dir:
        load_adapter(net, adapter_dir)
    ids = generate(net, [tokenizer.encode(text)], Sampling(max_new_tokens=max_tokens, stop_token_ids=tokenizer.stop_token_ids))[0]
    return tokenizer.decode([t for t in ids if t not in tokenizer.stop_token_ids])


class Server:
    def __init__(self, model, tokenizer, adapters=(), keys=(), lookup_history=False, **engine_args):
        from mightylm.serve.adapters import AdapterBank
        from mightylm.serve.app import create_app
        from mightylm.serve.engine import Engine

        bank = AdapterBank(copy.deepcopy(model))
        for name, path in adapters:
            bank.add(name, path)
        self.engine = Engine(bank.model, tokenizer, bank, **engine_args).start()
        self.url, self._stop = run_app(create_app(self.engine, "tiny", api_keys=keys, lookup_history=lookup_history))

    def close(self):
        self._stop()
        self.engine.stop()

    def post(self, path, body, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer, root = tiny
    s = Server(model, tokenizer, adapters=[("lora", root / "lora"), ("prompt", root / "prompt")], max_batch=8,
               max_len=256)
    yield s
    s.close()


def test_openai_client_streaming_and_not(server, tiny):
    import openai

    model, tokenizer, _ = tiny
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny", "tiny:lora", "tiny:prompt"]
    reply = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
    assert reply.choices[0].text == _reference(model, tokenizer, None, "To be, or not", 12)
    assert reply.usage.prompt_tokens == len(tokenizer.encode("To be, or not")) and reply.usage.completion_tokens >= 1
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12,
                                                                  temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == reply.choices[0].text
    messages = [{"role": "user", "content": "The quick brown fox"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    expected = _reference(model, tokenizer, None, tokenizer.apply_chat_template(messages), 10)
    assert chat.choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert streamed == expected
    two = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=3, n=2)
    again = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.text for c in two.choices] == [c.text for c in again.choices] and len(two.choices) == 2


def test_streamed_usage_and_echo(server, tiny):
    import openai

    model, tokenizer, _ = tiny
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    whole = client.completions.create(model="tiny", prompt="To be", max_tokens=9, temperature=0, n=2)
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=9, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    echoed = client.completions.create(model="tiny", prompt="To be", max_tokens=9, temperature=0, echo=True)
    assert echoed.choices[0].text == "To be" + whole.choices[0].text
    forced = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"


def test_ignore_eos_runs_through_stop_tokens(tiny):
    """ignore_eos (vLLM's extension, for fixed-length benchmarks): with the greedy first token declared
    a stop token, a request ends after 1 token, or runs to max_new_tokens when it ignores stops."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine, Sequence

    model, tokenizer, _ = tiny
    prompt = tokenizer.encode("To be")
    first = generate(model, [prompt], Sampling(max_new_tokens=1))[0][0]
    engine = Engine(model, tokenizer, AdapterBank(model), max_batch=2, max_len=64).start()
    try:
        ends = {}
        for ignore in (False, True):
            done = threading.Event()
            seq = Sequence(prompt, Sampling(max_new_tokens=6, stop_token_ids=(first,)),
                           lambda ev, done=done: ev["type"] == "done" and done.set(), ignore_eos=ignore)
            engine.submit(seq)
            assert done.wait(30)
            ends[ignore] = (len(seq.generated), seq.finish_reason)
    finally:
        engine.stop()
    assert ends == {False: (1, "stop"), True: (6, "length")}


@pytest.mark.parametrize("adapter", [None, "lora", "prompt"])
def test_eval_endpoint_against_the_server_equals_in_process(server, tiny, adapter):
    """`mighty eval --endpoint` against `mighty serve` gives what the evaluation's in-process LocalModel
    gives on the same model (and adapter): log-likelihoods via echo + logprobs with max_tokens 0, and
    greedy generations with a stop string."""
    from mightylm.adapters import load_adapter
    from mightylm.evaluate.backend import Endpoint, LocalModel

    model, tokenizer, root = tiny
    requests = [("To be, or not to be,", " that is the question"), ("The quick brown", " fox"),
                ("Héllo wörld,", " naïve café!")]
    name = "tiny" if adapter is None else f"tiny:{adapter}"
    remote = Endpoint(server.url + "/v1", name).loglikelihood(requests)
    net = copy.deepcopy(model)
    if adapter:
        load_adapter(net, root / adapter)
    local = LocalModel(net.eval(), tokenizer).loglikelihood(requests)
    for (lp, greedy, n), (ref_lp, ref_greedy, ref_n) in zip(remote, local):
        assert n == ref_n and greedy == ref_greedy and lp == pytest.approx(ref_lp, abs=1e-4)
    prompts = [c for c, _ in requests]  # generation too: mighty eval against mighty serve == in process
    kwargs = dict(max_new_tokens=12, stop=("e",))
    assert Endpoint(server.url + "/v1", name).generate(prompts, **kwargs) == LocalModel(net, tokenizer).generate(
        prompts, **kwargs)
    status, reply, _ = server.post("/v1/completions", {"model": name, "prompt": "To be", "max_tokens": 0,
                                                        "echo": True, "logprobs": 3})
    lp = reply["choices"][0]["logprobs"]
    assert status == 200 and reply["choices"][0]["text"] == "To be" and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == len(tokenizer.encode("To be")) and all(len(t) <= 3 for t in lp["top_logprobs"][1:])


def test_perplexity_over_the_endpoint_equals_local(server, tiny):
    """`mighty eval perplexity --endpoint`: the same token windows, sent as token-id prompts and scored by
    the server, give the local figure; ids outside the vocabulary are refused."""
    from conftest import SAMPLE_TEXT
    from mightylm.evaluate.backend import Endpoint
    from mightylm.evaluate.perplexity import perplexity

    model, tokenizer, _ = tiny
    text = SAMPLE_TEXT * 3
    local = perplexity(model, tokenizer, text, window=48, stride=20)
    remote = perplexity(Endpoint(server.url + "/v1", "tiny"), tokenizer, text, window=48, stride=20, batch_size=3)
    assert remote["tokens"] == local["tokens"] > 100 and remote["bytes"] == local["bytes"]
    assert remote["nll"] == pytest.approx(local["nll"], rel=1e-5)
    ids = tokenizer.encode("To be, or not")
    status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True})
    assert status == 200 and reply["choices"][0]["text"] == "To be, or not"
    status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": [1, 10**6], "max_tokens": 1})
    assert status == 400 and "10000" in reply["error"]["message"] and "vocabulary" in reply["error"]["message"]


def test_one_prefill_pass_for_mixed_prompts_and_adapters(tiny):
    """Requests waiting together are prefilled in one forward pass (prompts of different lengths, LoRA,
    soft prompt and base rows left-padded side by side) and each still gets its greedy text alone."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine, Sequence

    model, tokenizer, root = tiny
    bank = AdapterBank(copy.deepcopy(model))
    bank.add("lora", root / "lora")
    bank.add("prompt", root / "prompt")
    engine = Engine(bank.model, tokenizer, bank, max_batch=8, max_len=256)
    texts = ["To be", "The quick brown fox jumps over", "Héllo", "whether 'tis nobler in the mind to suffer"]
    jobs = [(text, adapter) for text in texts for adapter in (None, "lora", "prompt")][:8]
    got, finished, done = [""] * len(jobs), set(), threading.Event()

    def emit_for(i):
        def emit(ev):  # called in the engine thread
            got[i] += ev.get("text", "")
            if ev["type"] == "done":
                finished.add(i)
                if len(finished) == len(jobs):
                    done.set()
        return emit

    for i, (text, adapter) in enumerate(jobs):
        engine.submit(Sequence(tokenizer.encode(text), Sampling(max_new_tokens=10), emit_for(i),
                               adapter=bank.ids.get(adapter, 0)))
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.stop()
    assert engine.stats["prefill_passes"] == 1
    for i, (text, adapter) in enumerate(jobs):
        assert got[i] == _reference(model, tokenizer, adapter and root / adapter, text, 10), (text, adapter)


def test_mixed_adapters_in_one_batch_equal_each_alone(server, tiny):
    from concurrent.futures import ThreadPoolExecutor

    model, tokenizer, root = tiny
    prompts = ["To be, or not", "The quick brown fox jumps", "naïve café", "whether 'tis nobler"]
    jobs = [(m, p) for p in prompts for m in ("tiny", "tiny:lora", "tiny:prompt")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: server.post("/v1/completions", {"model": j[0], "prompt": j[1],
                                                                          "max_tokens": 16, "temperature": 0}), jobs))
    paths = {"tiny": None, "tiny:lora": root / "lora", "tiny:prompt": root / "prompt"}
    for (m, p), (status, body, _) in zip(jobs, replies):
        assert status == 200, body
        assert body["choices"][0]["text"] == _reference(model, tokenizer, paths[m], p, 16), (m, p)
    texts = {m: [b["choices"][0]["text"] for (mm, _), (_, b, _) in zip(jobs, replies) if mm == m] for m in paths}
    assert texts["tiny"] != texts["tiny:lora"] and texts["tiny"] != texts["tiny:prompt"]


def test_adapters_load_and_unload_at_run_time(server, tiny):
    _, _, root = tiny
    status, body, _ = server.post("/v1/completions", {"model": "tiny:late", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "adapter 'late' is not loaded" in body["error"]["message"]
    status, body, _ = server.post("/admin/adapters", {"name": "late", "path": str(root / "lora")})
    assert status == 200 and body["loaded"].startswith("LoRA")
    assert server.post("/v1/completions", {"model": "tiny:late", "prompt": "x", "max_tokens": 2})[0] == 200
    request = urllib.request.Request(server.url + "/admin/adapters/late", method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["unloaded"]
    assert server.post("/v1/completions", {"model": "tiny:late", "prompt": "x", "max_tokens": 2})[0] == 404
    status, body, _ = server.post("/admin/adapters", {"name": "bad", "path": str(root / "nowhere")})
    assert status == 400 and "no such adapter directory" in body["error"]["message"]


def test_bad_input_gets_4xx_and_the_server_keeps_serving(server):
    ok = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    cases = [
        (None, b"{not json"), (None, b"\xff\xfe\x00garbage"), (None, b"[1, 2]"),
        ({"prompt": "hello"}, None), ({**ok, "max_tokens": -1}, None), ({**ok, "max_tokens": 10**9}, None),
        ({**ok, "max_tokens": "ten"}, None), ({**ok, "temperature": "hot"}, None), ({**ok, "top_p": 0}, None),
        ({**ok, "stop": [1, 2]}, None), ({**ok, "n": 100}, None), ({**ok, "frobnicate": True}, None),
        ({**ok, "prompt": 42}, None), ({**ok, "prompt": "word " * 400}, None), ({**ok, "model": "gpt-4"}, None),
        ({**ok, "stream": "yes"}, None), (None, b'{"prompt": "' + b"x" * (1 << 21) + b'"}'),
        ({**ok, "echo": "yes"}, None), ({**ok, "logprobs": 21}, None), ({**ok, "logprobs": 1, "stream": True}, None),
        ({**ok, "seed": 2**64}, None), ({**ok, "seed": -2**63 - 1}, None), ({**ok, "top_k": -2}, None),
        ({**ok, "prompt": []}, None), ({**ok, "prompt": [[1, 2], "x", 3]}, None), ({**ok, "prompt": [[1, 10**9]]}, None),
        ({**ok, "prompt": ["hello"] * 65}, None),
        ({**ok, "max_tokens": 0}, None), ({**ok, "stream_options": {"include_usage": 1}}, None),
        ({**ok, "echo": True, "max_tokens": 0, "logprobs": 1, "n": 2}, None),
    ]
    for body, raw in cases:
        status, reply, _ = server.post("/v1/completions", body, raw=raw)
        assert 400 <= status < 500, (body if raw is None else raw[:40], status, reply)
        assert isinstance(reply["error"]["message"], str) and reply["error"]["type"]
    for messages in (None, [], [{"role": "user"}], [{"role": "wizard", "content": "hi"}], "hi"):
        status, reply, _ = server.post("/v1/chat/completions", {"model": "tiny", "messages": messages})
        assert status == 400 and "messages" in reply["error"]["message"]
    assert server.post("/v1/completions", ok)[0] == 200


def test_an_oversized_body_gets_a_413_not_a_connection_reset(server):
    # Answering before the client finished sending made its kernel report a reset instead of our answer (CI saw it
    # at 2 MiB; at 12 MiB it happened every time before the server drained what it refuses).
    body = b'{"prompt": "' + b"x" * (12 << 20) + b'"}'
    for _ in range(5):
        status, reply, _ = server.post("/v1/completions", None, raw=body)
        assert status == 413 and "over 1048576 bytes" in reply["error"]["message"]
    assert server.post("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2})[0] == 200


def test_api_keys_guard_every_endpoint(tiny):
    model, tokenizer, _ = tiny
    s = Server(model, tokenizer, keys=("key-1",), max_batch=2, max_len=128)
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        status, reply, _ = s.post("/v1/completions", body)
        assert status == 401 and reply["error"]["type"] == "authentication_error"
        assert s.post("/v1/completions", body, {"Authorization": "Bearer nope"})[0] == 401
        assert s.post("/v1/completions", body, {"Authorization": "Bearer key-1"})[0] == 200
        large = b'{"prompt": "' + b"x" * (12 << 20) + b'"}'  # refused unread, it used to come back as a reset
        for _ in range(3):
            assert s.post("/v1/completions", None, raw=large)[0] == 401
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.url + "/metrics", timeout=10)
        assert e.value.code == 401
        with urllib.request.urlopen(s.url + "/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        s.close()


def test_a_full_queue_answers_429_and_disconnects_free_rows(tiny, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    model, tokenizer, _ = tiny
    # Every forward pass takes 10 ms more, so a 200-token reply lasts over 2 s: the row is still busy when the
    # other requests arrive and when the streaming client goes away (the tiny model alone could finish first).
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    s = Server(model, tokenizer, max_batch=1, max_queue=1, max_len=256)
    try:
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: s.post("/v1/completions", body), range(6)))
        statuses = sorted(r[0] for r in results)
        assert 200 in statuses and 429 in statuses, statuses
        rejected = next(r for r in results if r[0] == 429)
        assert rejected[2].get("retry-after") == "1" and "busy" in rejected[1]["error"]["message"]
        # A client that goes away mid-stream: its row is freed.
        request = urllib.request.Request(s.url + "/v1/completions", method="POST",
                                         data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=30)
        response.readline()
        assert s.engine.load()["running"] == 1
        response.close()
        deadline = time.time() + 20
        while s.engine.load()["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert s.engine.load() == {"running": 0, "waiting": 0}
        assert s.engine.stats["finished"].get("cancelled", 0) >= 1
        with urllib.request.urlopen(s.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "mightylm_generated_tokens_total" in text and 'mightylm_time_to_first_token_seconds{quantile="0.5"}' in text
        assert "mightylm_queue_length 0" in text
    finally:
        s.close()


def test_chat_page_is_served(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "<title>mightylm chat</title>" in page and "/v1/chat/completions" in page and "stream: true" in page


def test_chat_page_streams_a_reply_in_a_real_browser(server, tiny, browser, tmp_path):
    """Headless Chromium: pick an adapter, send a message, watch the reply arrive piece by piece; the text
    equals the greedy reply of the same conversation through the same adapter; a screenshot is kept."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    model, tokenizer, root = tiny
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny:lora")
    temp = browser.find_element(By.ID, "temp")
    temp.clear()
    temp.send_keys("0")
    # count how many times the reply's text changes: a streamed reply changes more than once
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById("log"),
            {childList: true, subtree: true, characterData: true});""")
    browser.find_element(By.ID, "input").send_keys("The quick brown fox", Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
               and d.find_element(By.ID, "send").is_enabled())
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "The quick brown fox"}])
    room = server.engine.max_len - len(tokenizer.encode(prompt))
    assert reply == _reference(model, tokenizer, root / "lora", prompt, min(256, room)) and reply
    assert browser.execute_script("return window.updates") > 3  # user line, empty reply, then several pieces
    # a long unbroken reply wraps inside the log instead of scrolling it sideways
    assert browser.execute_script("const l = document.getElementById('log'); return l.scrollWidth <= l.clientWidth")
    shot = tmp_path / "chat-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5000
    print(f"screenshot: {shot}")


def test_list_options_repeat_on_the_command_line(capsys):
    from mightylm.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "a=x", "--adapter", "b=y", "--api-key", "k1", "--print_config"])
    printed = capsys.readouterr().out
    assert "adapter:\n- a=x\n- b=y" in printed and "api_key:\n- k1" in printed


# ---- issue 16: one bad request fails only itself; real clients work unchanged ----


def test_a_poisoned_request_fails_alone_and_the_others_complete_unchanged(tiny):
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine, Sequence

    model, tokenizer, _ = tiny
    engine = Engine(model, tokenizer, AdapterBank(model), max_batch=8, max_len=256)
    prompts = ["To be, or not", "The quick brown", "Hello there", "whether 'tis nobler"]
    results = {i: {"text": "", "done": None} for i in range(len(prompts) + 1)}

    def emit_for(i):
        def emit(ev):
            if ev["type"] == "text":
                if i == 4:
                    raise RuntimeError("this listener breaks on its first text")
                results[i]["text"] += ev["text"]
            else:
                results[i]["done"] = ev
        return emit

    seeds = [None, None, 2**64, None]  # 2**64 overflows torch's generator: the row that poisoned the batch before
    for i, (text, seed) in enumerate(zip(prompts, seeds)):
        engine.submit(Sequence(tokenizer.encode(text), Sampling(max_new_tokens=12, seed=seed), emit_for(i)))
    engine.submit(Sequence(tokenizer.encode("Hello there"), Sampling(max_new_tokens=12), emit_for(4)))
    engine.start()
    try:
        deadline = time.time() + 30
        while any(r["done"] is None for r in results.values()) and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    assert engine.stats["prefill_passes"] == 1  # they shared a batch
    for i in (0, 1, 3):
        assert results[i]["done"]["finish_reason"] in ("length", "stop") and "error" not in results[i]["done"]
        assert results[i]["text"] == _reference(model, tokenizer, None, prompts[i], 12)
    assert results[2]["done"]["finish_reason"] == "error" and "Overflow" in results[2]["done"]["error"]
    assert results[4]["done"]["finish_reason"] == "error" and "listener breaks" in results[4]["done"]["error"]


def _slow(model, seconds: float):
    """A copy of `model` whose every forward pass takes at least `seconds` (so a test can act mid-generation)."""
    slow = copy.deepcopy(model)
    slow.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return slow


def test_a_non_streaming_client_that_goes_away_frees_its_row(tiny):
    model, tokenizer, _ = tiny
    s = Server(_slow(model, 0.02), tokenizer, max_batch=2, max_len=256)
    try:
        body = json.dumps({"model": "tiny", "prompt": "To be", "max_tokens": 200, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1]))) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.time() + 10
            while s.engine.load()["running"] == 0 and time.time() < deadline:
                time.sleep(0.02)
            assert s.engine.load()["running"] == 1
        gone = time.time()
        while s.engine.load()["running"] and time.time() < gone + 10:
            time.sleep(0.02)
        assert s.engine.load()["running"] == 0 and time.time() - gone < 2  # 200 tokens would take over 4 s
        assert s.engine.stats["finished"].get("cancelled", 0) == 1
        assert s.engine.stats["generated_tokens"] < 100
    finally:
        s.close()


def test_loading_an_adapter_does_not_stall_generation(tiny, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    model, tokenizer, root = tiny
    s = Server(model, tokenizer, max_batch=4, max_len=256)
    prepare = s.engine.bank.prepare

    def slow_prepare(*args):  # a slow disk: reading the adapter takes 3 s
        time.sleep(3)
        return prepare(*args)

    monkeypatch.setattr(s.engine.bank, "prepare", slow_prepare)
    try:
        with ThreadPoolExecutor(1) as pool:
            loading = pool.submit(s.post, "/admin/adapters", {"name": "late", "path": str(root / "lora")})
            time.sleep(0.3)
            started = time.time()
            status, reply, _ = s.post("/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 8})
            assert status == 200 and time.time() - started < 2 and not loading.done()
            assert loading.result(timeout=30)[0] == 200
        assert s.post("/v1/completions", {"model": "tiny:late", "prompt": "x", "max_tokens": 2})[0] == 200
        for path in (root / "nowhere", root):  # a missing directory and one without an adapter: the same answer
            status, reply, _ = s.post("/admin/adapters", {"name": "bad", "path": str(path)})
            assert status == 400 and reply["error"]["message"] == (f"{path}: no such adapter directory on the server "
                                                                   "(one holding adapter_config.json and "
                                                                   "adapter_model.safetensors)")
    finally:
        s.close()


def test_legacy_completions_take_every_prompt_shape(server, tiny):
    model, tokenizer, _ = tiny
    texts = ["To be, or not", "The quick brown"]
    ids = [tokenizer.encode(t) for t in texts]
    alone = [server.post("/v1/completions", {"model": "tiny", "prompt": t, "max_tokens": 6, "temperature": 0})[1]
             for t in texts]
    expected = [a["choices"][0]["text"] for a in alone]
    for prompt in (texts, ids):
        status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                           "temperature": 0})
        assert status == 200 and [c["index"] for c in reply["choices"]] == [0, 1]
        assert [c["text"] for c in reply["choices"]] == expected
        assert reply["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": texts, "max_tokens": 6,
                                                       "temperature": 0, "n": 2})
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]  # prompt i's samples at i * n ...
    assert [c["text"] for c in reply["choices"]] == [expected[0]] * 2 + [expected[1]] * 2
    status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                                       "logprobs": 0})
    assert [c["text"] for c in reply["choices"]] == texts and reply["choices"][1]["logprobs"]["token_logprobs"][0] is None


def _loglik(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Log-likelihood of `continuation` after `context` and whether it is the greedy continuation, in process."""
    idx = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(idx)[0, :-1].float(), dim=-1)[len(context) - 1:]
    target = torch.tensor(continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_lm_eval_harness_requests_score_like_the_model(server, tiny):
    """The two payloads lm-evaluation-harness's `local-completions` sends for log-likelihood tasks, parsed the way
    its `parse_logprobs` does (lm_eval 0.4: token_logprobs[ctxlen:-1], greedy when each equals the top value)."""
    model, tokenizer, _ = tiny
    pairs = [("Question: To be, or not to", " be"), ("The quick brown", " fox jumps"), ("Hello", " sea")]
    requests = [(tokenizer.encode(c), tokenizer.encode(c + x)[len(tokenizer.encode(c)):]) for c, x in pairs]
    for tokenized in (True, False):
        prompt = [c + x for c, x in requests] if tokenized else [c + x for c, x in pairs]
        status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0,
                                                           "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
        assert status == 200, reply
        for choice, (context, continuation) in zip(sorted(reply["choices"], key=lambda c: c["index"]), requests):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(context) + len(continuation) + 1 and lp["token_logprobs"][0] is None
            assert lp["top_logprobs"][0] is None and all(len(t) == 1 for t in lp["top_logprobs"][1:])
            ctxlen = len(context)
            score = sum(lp["token_logprobs"][ctxlen:-1])
            greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                 lp["top_logprobs"][ctxlen:-1]))
            expected, expected_greedy = _loglik(model, context, continuation)
            assert score == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy
            assert lp["text_offset"][:2] == [0, len(tokenizer.decode(context[:1]))]


def test_logprobs_of_generated_tokens(server, tiny):
    model, tokenizer, _ = tiny
    prompt = tokenizer.encode("To be, or not")
    status, reply, _ = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                       "temperature": 0, "logprobs": 3, "ignore_eos": True})
    assert status == 200, reply
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == reply["usage"]["completion_tokens"] == 8
    generated = generate(model, [prompt], Sampling(max_new_tokens=8))[0]  # greedy, through stop tokens
    assert lp["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in generated]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + generated]))[0].float(), dim=-1)
    for k, (value, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"])):
        row = logp[len(prompt) - 1 + k]
        assert value == pytest.approx(float(row[generated[k]]), abs=1e-4) == pytest.approx(float(row.max()), abs=1e-4)
        assert 1 <= len(top) <= 3 and max(top.values()) == value  # greedy: the token is its row's best
    text = reply["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"]) and max(lp["text_offset"]) <= len(text)


def test_mighty_serve_takes_keys_from_the_environment_refuses_a_used_port_and_stops_on_sigterm(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import mightylm
    from mightylm.serve.command import start_server

    model, tokenizer, _ = tiny
    mightylm.save(model, tokenizer, tmp_path / "model")
    os.environ["MIGHTY_API_KEY"] = "k1,k2"
    try:
        url, process = start_server(["--model", str(tmp_path / "model"), "--name", "tiny", "--max-batch", "1",
                                     "--drain-timeout", "2"], tmp_path / "serve.log")
    finally:
        del os.environ["MIGHTY_API_KEY"]
    try:
        def post(key=None, **body):
            request = urllib.request.Request(url + "/v1/completions", method="POST", data=json.dumps(
                {"model": "tiny", "prompt": "To be", **body}).encode(), headers={
                "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return None  # the server went away mid-request

        assert post(max_tokens=2) == 401 and post("k2", max_tokens=2) == 200
        log = (tmp_path / "serve.log").read_text()
        assert "serving tiny at" in log
        c = model.config  # the pool's size, printed at start: 1 row x the context, keys and values, float32
        pool = 2 * c.n_layers * c.n_kv_heads * c.head_dim * min(2048, c.max_seq_len) * 4
        assert f"KV-cache pool: 1 x {min(2048, c.max_seq_len)} tokens (--max_batch x --max_len), up to " \
               f"{pool / 2**20:,.0f} MiB" in log
        port = url.rsplit(":", 1)[1]
        second = subprocess.run([str(Path(sys.executable).with_name("mighty")), "serve", "--model",
                                 str(tmp_path / "model"), "--port", port], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "serving" not in second.stderr and "Traceback" not in second.stderr
        with ThreadPoolExecutor(4) as pool:  # one running, three waiting on the single row
            busy = [pool.submit(post, "k1", max_tokens=200, ignore_eos=True) for _ in range(4)]
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            started = time.time()
            process.wait(timeout=30)
            assert time.time() - started < 2 + 5  # the drain timeout, plus the engine's stop
            [b.result() for b in busy]
        assert process.returncode == 143  # drained, then exited with the shell's status for SIGTERM
    finally:
        if process.poll() is None:
            process.kill()


def test_lm_evaluation_harness_scores_through_the_server_as_its_hf_backend(bpe_tokenizer, tmp_path, monkeypatch):
    """EleutherAI's lm-evaluation-harness, unchanged: its `local-completions` client against our server gives
    the accuracy and log-likelihoods its `hf` backend gives on the same weights, with tokenized requests and
    with text."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval[api] is in the test extras: pip install -e '.[test]'")
    from lm_eval.tasks import TaskManager

    import mightylm
    from conftest import make_hf_model

    model_dir = tmp_path / "model"
    make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size).save_pretrained(model_dir)
    bpe_tokenizer.save(model_dir)
    questions = [{"question": "To be, or not to", "choices": ["be", "fox", "sea"], "answer": 0},
                 {"question": "The quick brown", "choices": ["fox", "sea", "question"], "answer": 1},
                 {"question": "whether 'tis nobler in the", "choices": ["mind", "dog", "café"], "answer": 0},
                 {"question": "Héllo wörld, naïve", "choices": ["café", "arrows", "fortune"], "answer": 2},
                 {"question": "slings and", "choices": ["arrows", "troubles"], "answer": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(
        "task: mighty_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    monkeypatch.chdir(tmp_path)  # lm-eval asks git for a commit hash of the working directory

    def scores(results):
        return results["results"]["mighty_mc"]["acc,none"], [r["resps"] for r in results["samples"]["mighty_mc"]]

    acc, reference = scores(lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                                    tasks=["mighty_mc"], task_manager=tasks, log_samples=True,
                                                    device="cpu", batch_size=4))
    net, tokenizer = mightylm.load(model_dir)
    s = Server(net, tokenizer, max_batch=8, max_len=256)
    try:
        for tokenized in (True, False):
            args = (f"model=tiny,base_url={s.url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
                    f"tokenized_requests={tokenized},num_concurrent=2,max_retries=1")
            got_acc, got = scores(lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                                          tasks=["mighty_mc"], task_manager=tasks, log_samples=True))
            assert got_acc == acc
            flat = [r for question in got for choice in question for r in choice]
            expected = [r for question in reference for choice in question for r in choice]
            assert len(flat) == len(expected) == 14
            for (loglik, greedy), (ref_loglik, ref_greedy) in zip(flat, expected):
                assert loglik == pytest.approx(ref_loglik, abs=1e-3) and greedy == ref_greedy
    finally:
        s.close()


# ---- speculative decoding in the server (issue 21) ----

def _run(engine, jobs) -> list[dict]:
    """Submit (prompt ids, Sampling, Sequence options) jobs together, run the engine until all are done; each
    result is {"text", "done" (the done event)}."""
    from mightylm.serve.engine import Sequence

    results = [{"text": "", "done": None} for _ in jobs]
    finished = threading.Event()

    def emit_for(i):
        def emit(ev):
            if ev["type"] == "text":
                results[i]["text"] += ev["text"]
            else:
                results[i]["done"] = ev
                if all(r["done"] for r in results):
                    finished.set()
        return emit

    for i, (ids, s, options) in enumerate(jobs):
        engine.submit(Sequence(ids, s, emit_for(i), **options))
    engine.start()
    try:
        assert finished.wait(60)
    finally:
        engine.stop()
    return results


def _draft_for(base, kind):
    import conftest
    from mightylm.speculative import PromptLookup

    if kind == "prompt-lookup":
        return PromptLookup()
    if kind == "target":
        return copy.deepcopy(base)
    return conftest.tiny(1, vocab_size=base.config.vocab_size, n_layers=1, dim=32, n_heads=2, n_kv_heads=1,
                         ffn_dim=64)


@pytest.mark.parametrize("kind", ["prompt-lookup", "model", "target"])
@pytest.mark.parametrize("max_len", [256, 40])  # 40: the pool runs full, so rows are compacted and steps narrowed
def test_greedy_speculative_batches_equal_each_request_alone(tiny, kind, max_len):
    """Mixed requests in one batch (LoRA, soft prompt and base rows; different lengths; one opted out), every step
    as wide as the drafts allow: each row's text equals plain greedy decoding of it alone."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    model, tokenizer, root = tiny
    bank = AdapterBank(copy.deepcopy(model))
    bank.add("lora", root / "lora")
    bank.add("prompt", root / "prompt")
    engine = Engine(bank.model, tokenizer, bank, max_batch=6, max_len=max_len, draft=_draft_for(model, kind), gamma=4,
                    always_speculate=True)
    texts = ["To be, or not to be, or not", "The quick brown fox", "ab ab ab ab", "whether 'tis nobler in the mind"]
    jobs = [(text, adapter, opt_out) for text, adapter, opt_out in
            zip(texts + texts[:2], [None, "lora", "prompt", None, None, "lora"], [False] * 5 + [True])]
    budget = lambda text, adapter: min(20, max_len - len(tokenizer.encode(text)) - bank.prefix_len(bank.ids.get(adapter, 0)))
    results = _run(engine, [(tokenizer.encode(text), Sampling(max_new_tokens=budget(text, adapter), temperature=0),
                             {"adapter": bank.ids.get(adapter, 0), "speculative": not opt_out})
                            for text, adapter, opt_out in jobs])
    for (text, adapter, opt_out), r in zip(jobs, results):
        assert r["done"]["finish_reason"] in ("stop", "length"), r["done"].get("error")
        assert r["text"] == _reference(model, tokenizer, adapter and root / adapter, text, budget(text, adapter)), \
            (text, adapter)
    assert results[-1]["done"]["drafted"] == 0  # the opted-out request took no drafts
    assert engine.stats["speculative_passes"] > 0 and engine.stats["drafted_tokens"] > 0
    if kind == "target":  # the target drafting for itself: every drafted token of an adapter-free row is accepted
        plain_rows = [r["done"] for (_, adapter, opt_out), r in zip(jobs, results) if adapter is None and not opt_out]
        assert all(d["accepted"] == d["drafted"] > 0 for d in plain_rows)


def test_seeded_sampled_rows_with_prompt_lookup_give_plain_decodings_text(tiny):
    """Prompt lookup's drafts are checked by drawing each token as a plain step draws it (accept_copied): a seeded
    sampled request gets the text a plain engine gives it, in a batch, whatever was drafted."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine
    from mightylm.speculative import PromptLookup

    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked distributions: text that repeats itself, so lookup finds drafts
    texts = ["To be, or not to be, or not to be", "ab ab ab ab ab ab", "The quick brown fox, the quick brown"]
    jobs = [(tokenizer.encode(text), Sampling(max_new_tokens=24, temperature=0.3, top_k=8, seed=i),
             {"ignore_eos": True}) for i, text in enumerate(texts)]
    plain = _run(Engine(model, tokenizer, AdapterBank(model), max_batch=4, max_len=128), jobs)
    engine = Engine(model, tokenizer, AdapterBank(model), max_batch=4, max_len=128, draft=PromptLookup(), gamma=4,
                    always_speculate=True)
    spec = _run(engine, jobs)
    assert [r["text"] for r in spec] == [r["text"] for r in plain]
    assert sum(r["done"]["accepted"] for r in spec) > 0 and engine.stats["speculative_passes"] > 0


def test_prompt_lookup_steps_chosen_by_the_engine_keep_each_requests_text(tiny):
    """Without always_speculate the engine chooses each step's width from the passes it timed and the rows'
    acceptance (and probes when it has declined for a while): texts as plain decoding's."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine
    from mightylm.speculative import PromptLookup

    model, tokenizer, _ = tiny
    texts = ["To be, or not to be, or not to be", "ab ab ab ab ab ab", "The quick brown fox, the quick brown"]
    jobs = [(tokenizer.encode(text), Sampling(max_new_tokens=40, temperature=0), {"ignore_eos": True})
            for text in texts]
    plain = _run(Engine(model, tokenizer, AdapterBank(model), max_batch=4, max_len=128), jobs)
    engine = Engine(model, tokenizer, AdapterBank(model), max_batch=4, max_len=128, draft=PromptLookup(), gamma=4)
    assert [r["text"] for r in _run(engine, jobs)] == [r["text"] for r in plain]
    assert engine.stats["speculative_passes"] > 0  # (at least the probes measured)


def test_sampled_speculative_rows_with_the_target_as_draft_accept_nearly_all(tiny):
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    model, tokenizer, _ = tiny
    engine = Engine(model, tokenizer, AdapterBank(model), max_batch=4, max_len=128, draft=copy.deepcopy(model),
                    gamma=3, always_speculate=True)
    results = _run(engine, [(tokenizer.encode(text), Sampling(max_new_tokens=24, temperature=0.8, top_k=40, seed=i),
                             {"ignore_eos": True}) for i, text in enumerate(["To be", "The quick", "Hello"])])
    for r in results:
        assert r["done"]["completion_tokens"] == 24
        assert r["done"]["accepted"] >= 0.9 * r["done"]["drafted"] > 0  # p == q up to rounding: min(1, p/q) ~ 1
    assert engine.stats["speculative_passes"] < 24  # several tokens per target pass


def test_the_width_is_chosen_by_expected_tokens_per_second():
    from mightylm.serve.speculation import PassCost, choose_width, expected_tokens

    assert expected_tokens(0.5, 0) == 1 and expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5
    cheap_rows, linear = PassCost(), PassCost()
    for rows in (1, 2, 4, 8, 16, 32):
        cheap_rows.observe(rows, 0.010 + 0.0001 * rows)  # weight-bound: extra rows nearly free
        linear.observe(rows, 0.0001 + 0.005 * rows)  # compute-bound: every row costs the same
    assert cheap_rows.predict(10) == pytest.approx(0.011) and linear.predict(10) == pytest.approx(0.0501)
    assert choose_width([4], [0.7], 4, cheap_rows) == 4  # one stream, extra rows cheap: as wide as allowed
    assert choose_width([4] * 8, [0.5] * 8, 4, linear) == 0  # rows cost what they yield: plain steps
    assert choose_width([0] * 8, [0.9] * 8, 4, cheap_rows) == 0  # nothing drafted: nothing to gain


def test_the_server_reports_speculation_in_usage_and_metrics(tiny):
    model, tokenizer, _ = tiny
    server = Server(model, tokenizer, max_batch=4, max_len=128, draft=_draft_for(model, "model"), always_speculate=True)
    try:
        body = {"model": "tiny", "prompt": "To be, or not", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        status, reply, _ = server.post("/v1/completions", body)
        assert status == 200, reply
        spec = reply["usage"]["speculative"]
        assert spec["drafted_tokens"] > 0 and spec["acceptance_rate"] == pytest.approx(
            spec["accepted_tokens"] / spec["drafted_tokens"], abs=1e-4)
        status, off, _ = server.post("/v1/completions", {**body, "speculative": False})
        assert status == 200 and off["usage"]["speculative"]["drafted_tokens"] == 0
        assert off["choices"][0]["text"] == reply["choices"][0]["text"]
        status, bad, _ = server.post("/v1/completions", {**body, "speculative": "no"})
        assert status == 400 and bad["error"]["param"] == "speculative"
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f"mightylm_draft_tokens_total {spec['drafted_tokens']}" in metrics
        assert f"mightylm_accepted_draft_tokens_total {spec['accepted_tokens']}" in metrics
    finally:
        server.close()


def test_each_user_drafts_from_their_own_earlier_answers(tiny):
    """`mighty serve --draft prompt-lookup --lookup_history`: a key's repeated request drafts from that key's first
    answer (more drafted and accepted, the same text); another key's identical request drafts exactly as the first
    did, with no history: no one's drafts (and the acceptance their usage reports) come from another's answers."""
    model, tokenizer, _ = tiny
    server = Server(model, tokenizer, keys=("alice-key", "bob-key"), lookup_history=True, max_batch=2, max_len=128,
                    draft=_draft_for(model, "prompt-lookup"), always_speculate=True)
    try:
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True}

        def ask(key):
            status, reply, _ = server.post("/v1/completions", body, headers={"Authorization": f"Bearer {key}"})
            assert status == 200, reply
            return reply["choices"][0]["text"], reply["usage"]["speculative"]

        (text1, first), (text2, again), (text3, other) = ask("alice-key"), ask("alice-key"), ask("bob-key")
        assert text1 == text2 == text3
        assert again["drafted_tokens"] > first["drafted_tokens"] and again["accepted_tokens"] > first["accepted_tokens"]
        assert other == first
    finally:
        server.close()


# ---- chunked prefill (issue 22) ----

@pytest.mark.parametrize("draft", [None, "model"])
def test_long_prompts_are_prefilled_in_chunks_while_others_decode(tiny, draft):
    """Prompts longer than prefill_chunk are prefilled a chunk per step on their own cache, decode steps of the
    running rows in between, then join the pool: every text equals plain greedy decoding alone (LoRA and soft
    prompt rows included, and with a draft model whose pool must follow)."""
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    model, tokenizer, root = tiny
    bank = AdapterBank(copy.deepcopy(model))
    bank.add("lora", root / "lora")
    bank.add("prompt", root / "prompt")
    engine = Engine(bank.model, tokenizer, bank, max_batch=4, max_len=256, prefill_chunk=8,
                    draft=_draft_for(model, draft) if draft else None, always_speculate=bool(draft))
    during = {"steps": 0}
    decode = engine._decode

    def counted(carry=None):
        during["steps"] += engine.staging is not None
        return decode(carry)

    engine._decode = counted
    long_text = "whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune"
    jobs = [("To be", None), (long_text, "lora"), ("Hi", None), (long_text[:40], "prompt"), (long_text, None)]
    results = _run(engine, [(tokenizer.encode(text), Sampling(max_new_tokens=12, temperature=0),
                             {"adapter": bank.ids.get(adapter, 0)}) for text, adapter in jobs])
    for (text, adapter), r in zip(jobs, results):
        assert r["text"] == _reference(model, tokenizer, adapter and root / adapter, text, 12), (text, adapter)
    assert engine.stats["prefill_chunks"] >= 3 * 3  # three long prompts, each several chunks
    assert during["steps"] > 0  # the short requests decoded while a long prompt was being prefilled
    if draft is None:  # plain steps carried chunks in their own pass (speculative ones run them apart)
        assert engine.stats["carried_chunks"] > 0


def test_a_carried_chunk_that_fails_is_run_apart_and_no_row_suffers(tiny, monkeypatch):
    """If the pass carrying a chunk raises, the chunk and the step are run again apart: every text is still what
    plain greedy decoding alone gives."""
    from mightylm.model import Segments
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    model, tokenizer, _ = tiny
    bank = AdapterBank(copy.deepcopy(model))
    engine = Engine(bank.model, tokenizer, bank, max_batch=4, max_len=256, prefill_chunk=8)
    failed = []

    def broken(self, *args):
        failed.append(1)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(Segments, "attend", broken)
    long_text = "whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune"
    jobs = ["To be", long_text, "Hi"]
    results = _run(engine, [(tokenizer.encode(text), Sampling(max_new_tokens=12, temperature=0), {})
                            for text in jobs])
    for text, r in zip(jobs, results):
        assert r["text"] == _reference(model, tokenizer, None, text, 12), text
    assert failed and engine.stats["carried_chunks"] == 0 and engine.stats["prefill_chunks"] >= 3


def test_mighty_serve_with_a_draft_model_chunked_prefill_and_a_rope_scaling(tiny, tmp_path):
    """The command wires --draft (a model directory), --gamma, --prefill_chunk and --rope_scaling into the engine;
    a self-draft (layers:N) is refused there with what to use instead."""
    import subprocess
    import sys

    import mightylm
    from mightylm.serve.command import start_server

    model, tokenizer, _ = tiny
    mightylm.save(model, tokenizer, tmp_path / "model")
    mightylm.save(_draft_for(model, "model"), tokenizer, tmp_path / "draft")
    log = tmp_path / "serve.log"
    url, process = start_server(["--model", str(tmp_path / "model"), "--name", "tiny", "--draft", str(tmp_path / "draft"),
                                 "--gamma", "3", "--prefill_chunk", "8", "--rope_scaling", "yarn:2"], log)
    try:
        long_prompt = "whether 'tis nobler in the mind to suffer the slings and arrows"  # over 8 tokens: chunked
        request = urllib.request.Request(url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "tiny", "prompt": long_prompt, "max_tokens": 6,
                                                          "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["completion_tokens"] >= 1 and "speculative" in reply["usage"]
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            assert "mightylm_draft_tokens_total" in r.read().decode()
    finally:
        process.terminate()
        process.wait(30)
    printed = log.read_text()
    assert "speculative decoding: " in printed and "up to 3 drafted tokens" in printed
    assert "RoPE scaling none -> yarn x2" in printed
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    refused = subprocess.run([sys.executable, "-m", "mightylm.cli", "serve", "--model", str(tmp_path / "model"),
                              "--draft", "layers:1", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--draft layers:N is for `mighty generate|chat`" in refused.stderr
