"""What an evaluation talks to: a local model, or any OpenAI-compatible endpoint.

Both answer the two questions every task asks:
    generate(prompts, max_new_tokens, stop, temperature, seeds) -> completions (text)
    loglikelihood([(context, continuation), ...]) -> [(sum of log-probabilities, greedy?, tokens)]

A local model batches; results do not depend on the batch size (tests), and sampled completions
draw from one random stream per request (`seeds`), so they do not depend on the batching either.
An endpoint is called over HTTP (`/v1/completions`) with a few requests in flight; log-likelihoods
need `echo` with `logprobs`, which vLLM and `mighty serve` support and many hosted APIs do not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from mightylm.errors import MightyError


class EvalError(MightyError, ValueError):
    """An evaluation that cannot run: the message names what and where."""


def read_jsonl(path):
    """(line number, object) per line of a JSONL file (`data.iter_jsonl`), its errors as EvalError."""
    from mightylm.data import DataError, iter_jsonl

    try:
        yield from iter_jsonl(path)
    except DataError as e:
        raise EvalError(str(e)) from None


def truncate_at_stop(text: str, stop) -> str:
    cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cut)] if cut else text


class LocalModel:
    def __init__(self, model, tokenizer, *, name: str = "model", batch_size: int = 8):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    def encode_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: tuple[str, ...] = (),
                 temperature: float = 0.0, top_p: float | None = None, seeds: list[int] | None = None,
                 enough: Callable[[str], bool] | None = None) -> list[str]:
        """Completions of `prompts`, each cut at its first `stop` string. A row also stops generating once
        `enough(text so far)` is true (a caller's promise that later text would not change its answer:
        for a chat reply, once its first code block is closed); endpoints cannot be told and generate on."""
        from mightylm.generate import Sampling, generate_steps
        from mightylm.streaming import TextStream

        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = [self.tokenizer.encode(p) for p in prompts[i:i + self.batch_size]]
            limit = self.model.config.max_seq_len - self.model.prefix_len - max(map(len, batch))
            if limit < 1:
                raise EvalError(f"a prompt of {max(map(len, batch))} tokens leaves no room to generate in the "
                                f"model's context of {self.model.config.max_seq_len}")
            s = Sampling(max_new_tokens=min(max_new_tokens, limit), temperature=temperature, top_p=top_p,
                         stop_token_ids=self.tokenizer.stop_token_ids)
            row_seeds = None if seeds is None or temperature == 0 else seeds[i:i + self.batch_size]
            texts, done = [TextStream(self.tokenizer, stop) for _ in batch], [False] * len(batch)
            for step in generate_steps(self.model, batch, s, row_seeds):
                for row, token in enumerate(step.tolist()):
                    if done[row]:
                        continue
                    if token in s.stop_token_ids:
                        done[row] = True
                        continue
                    texts[row].push(token)
                    done[row] = texts[row].stopped or bool(enough and enough(texts[row].seen))
                if all(done):
                    break
            # A row that ran to the token limit gives what it held back too; one that stopped keeps what it saw.
            out += [t.seen if finished else t.text + t.finish() for t, finished in zip(texts, done)]
        return out

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Each token-id prompt's per-token log-probabilities (None for the first), as Endpoint gives them."""
        device = self.model.device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            group = [p[-self.model.config.max_seq_len:] for p in prompts[i:i + self.batch_size]]
            width = max(len(p) for p in group)
            idx = torch.zeros(len(group), width, dtype=torch.long)
            for row, ids in enumerate(group):
                idx[row, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(self.model(idx.to(device)).float(), dim=-1)
            for row, ids in enumerate(group):
                target = torch.tensor(ids[1:], device=device)
                picked = logp[row, :len(ids) - 1].gather(-1, target[:, None])[:, 0].tolist()
                out.append([None, *picked])
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        """For each (context, continuation): the summed log-probability of the continuation's tokens given
        the context, whether greedy decoding would produce exactly them, and how many there are."""
        encoded = []
        for context, continuation in requests:
            ctx = self.tokenizer.encode(context)
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not cont:
                raise EvalError(f"the continuation {continuation!r} has no tokens")
            ids = (ctx + cont)[-self.model.config.max_seq_len:]
            encoded.append((ids, min(len(cont), len(ids) - 1)))
        device = self.model.device
        out = []
        for i in range(0, len(encoded), self.batch_size):
            group = encoded[i:i + self.batch_size]
            width = max(len(ids) for ids, _ in group)
            idx = torch.zeros(len(group), width, dtype=torch.long)
            for row, (ids, _) in enumerate(group):
                idx[row, :len(ids)] = torch.tensor(ids)
            logp = F.log_softmax(self.model(idx.to(device)).float(), dim=-1)
            for row, (ids, n) in enumerate(group):
                target = torch.tensor(ids[len(ids) - n:], device=device)
                scores = logp[row, len(ids) - n - 1:len(ids) - 1]  # position t predicts token t + 1
                out.append((scores.gather(-1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all()),
                            n))
        return out


class Endpoint:
    """An OpenAI-compatible server: `url` is its base (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, concurrency: int = 4,
                 timeout: float = 300.0):
        self.url, self.name, self.api_key = url.rstrip("/"), model, api_key
        self.concurrency, self.timeout = concurrency, timeout
        self.has_chat_template = False  # prompts are sent as plain completions

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise EvalError(f"{self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EvalError(f"{self.url}{path}: cannot reach the endpoint ({reason}); is the server running, "
                            "and is --endpoint its base URL (e.g. http://127.0.0.1:8000/v1)?") from None
        except ValueError:
            raise EvalError(f"{self.url}{path}: the reply is not JSON; is this an OpenAI-compatible server?") from None

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: tuple[str, ...] = (),
                 temperature: float = 0.0, top_p: float | None = None, seeds: list[int] | None = None,
                 enough: Callable[[str], bool] | None = None) -> list[str]:
        def one(i):  # `enough` cannot reach the server: replies come whole, which gives callers the same answers
            body = {"model": self.name, "prompt": prompts[i], "max_tokens": max_new_tokens,
                    "temperature": temperature, **({"stop": list(stop[:4])} if stop else {}),
                    **({"top_p": top_p} if top_p is not None else {}),
                    **({"seed": seeds[i]} if seeds is not None else {})}
            reply = self._post("/completions", body)
            try:
                return truncate_at_stop(reply["choices"][0]["text"], stop)  # servers accept at most 4 stops
            except (KeyError, IndexError, TypeError):
                raise EvalError(f"{self.url}/completions: the reply has no choices[0].text: {str(reply)[:200]}") from None

        return self._map(one, range(len(prompts)))

    def _echo(self, prompt: str | list[int], top: int) -> dict:
        """The prompt's `logprobs` record (tokens, token_logprobs, top_logprobs, text_offset), generating nothing."""
        reply = self._post("/completions", {"model": self.name, "prompt": prompt, "max_tokens": 0, "echo": True,
                                            "logprobs": top, "temperature": 0})
        try:
            lp = reply["choices"][0]["logprobs"]
            if isinstance(lp["token_logprobs"], list) and isinstance(lp["text_offset"], list):
                return lp
        except (KeyError, IndexError, TypeError):
            pass
        raise EvalError(f"{self.url}/completions: no prompt log-probabilities in the reply; this task needs "
                        "a server that supports echo with logprobs (vLLM, mighty serve)")

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Each token-id prompt's per-token log-probabilities (None for the first), scored as given."""
        def one(ids):
            logprobs = self._echo(ids, 0)["token_logprobs"]
            if len(logprobs) != len(ids):
                raise EvalError(f"{self.url}/completions: {len(logprobs)} log-probabilities for a prompt of {len(ids)} "
                                "token ids; the server must take token-id prompts as given (vLLM, mighty serve)")
            return logprobs

        return self._map(one, prompts)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        def one(request):
            context, continuation = request
            lp = self._echo(context + continuation, 1)
            offsets, logprobs, tops = lp["text_offset"], lp["token_logprobs"], lp.get("top_logprobs")
            picked = [i for i, off in enumerate(offsets) if off >= len(context)]
            if not picked or any(logprobs[i] is None for i in picked):
                raise EvalError(f"{self.url}/completions: the echoed log-probabilities do not cover the continuation")
            greedy = bool(tops) and all(max(tops[i], key=tops[i].get) == lp["tokens"][i] for i in picked)
            return sum(logprobs[i] for i in picked), greedy, len(picked)

        return self._map(one, requests)

