#!/usr/bin/env python3
"""The official `openai` package against a running `edgevlm serve` (started by crates/edgevlm-cli/tests/
serve.rs, or by hand):

    python tests/serve/openai_client.py --base-url http://127.0.0.1:PORT --api-key KEY \
        --model tiny-idefics3 --nocache-url http://127.0.0.1:PORT2 --max-request-bytes 1000000

Each check asserts exact values: statuses, the error shape, chunk shapes, equal answers. Exits non-zero
with the failing check's message; prints one line per check and the measured times.
"""
import argparse
import base64
import concurrent.futures
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "fixtures" / "images"


def data_uri(name):
    return "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def error_shape(resp, status, code=None):
    check(resp.status_code == status, f"status {resp.status_code} != {status}: {resp.text[:300]}")
    body = resp.json()
    err = body.get("error")
    check(isinstance(err, dict), f"no error object: {body}")
    check(set(err) == {"message", "type", "param", "code"}, f"error keys {sorted(err)}")
    check(isinstance(err["message"], str) and err["message"], "empty message")
    check(isinstance(err["type"], str), "type is not a string")
    if code is not None:
        check(err["code"] == code, f"code {err['code']!r} != {code!r}")
    return err


class Checks:
    def __init__(self, a):
        self.a = a
        self.client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key, max_retries=0)
        self.http = httpx.Client(base_url=a.base_url, timeout=120)
        self.auth = {"Authorization": f"Bearer {a.api_key}"}

    def ask(self, messages, **kw):
        kw.setdefault("max_tokens", 12)
        return self.client.chat.completions.create(model=self.a.model, messages=messages, **kw)

    def non_streaming(self):
        c = self.ask([{"role": "user", "content": "Say something."}], seed=5, temperature=0.8)
        check(c.id.startswith("chatcmpl-"), c.id)
        check(c.object == "chat.completion", c.object)
        check(c.model == self.a.model, f"model {c.model}")
        check(c.system_fingerprint and c.system_fingerprint.startswith("edgevlm-"), "fingerprint")
        check(abs(c.created - time.time()) < 600, "created")
        ch = c.choices[0]
        check(ch.index == 0 and ch.finish_reason in ("stop", "length"), ch.finish_reason)
        check(ch.message.role == "assistant" and ch.message.refusal is None, "message")
        check(ch.logprobs is None, "logprobs without asking")
        u = c.usage
        check(u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 12, "usage")
        return c

    def streaming_equals_whole(self, whole):
        text, chunks = "", []
        stream = self.ask([{"role": "user", "content": "Say something."}], seed=5, temperature=0.8,
                          stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        check(text == whole.choices[0].message.content, f"{text!r} != {whole.choices[0].message.content!r}")
        check(chunks[0].choices[0].delta.role == "assistant", "role first")
        check(all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks), "ids")
        check(all(c.system_fingerprint == whole.system_fingerprint for c in chunks), "fingerprint")
        check(all(c.usage is None for c in chunks[:-1]), "usage null before the last chunk")
        last = chunks[-1]
        check(last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens,
              f"last chunk {last}")
        check(chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason, "finish reason")

    def image_and_turns(self):
        c = self.ask([
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri("small.png")}},
                {"type": "text", "text": "What is in it?"}]},
            {"role": "assistant", "content": "Colours."},
            {"role": "user", "content": "Which ones?"},
        ], max_tokens=4)
        # 40x30 upscaled and split into 13 tiles of 64 image tokens.
        check(c.usage.prompt_tokens > 13 * 64, f"prompt tokens {c.usage.prompt_tokens}")

    def logprobs(self):
        c = self.ask([{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2)
        lp = c.choices[0].logprobs.content
        check(len(lp) >= 1, "no logprob entries")
        for e in lp:
            check(len(e.top_logprobs) == 2 and e.logprob <= 0.0 and isinstance(e.bytes, list), str(e))

    def accepted_fields(self):
        c = self.ask([{"role": "user", "content": "hi"}], max_tokens=2, store=False, metadata={"k": "v"},
                     user="u1", service_tier="auto", frequency_penalty=0.5, presence_penalty=0.5,
                     logit_bias={"42": -5}, parallel_tool_calls=False, extra_body={"unknown_x": 1})
        check(c.usage.completion_tokens <= 2, "answered")

    def errors(self):
        post = lambda body, headers=None: self.http.post(  # noqa: E731
            "/v1/chat/completions", content=body, headers={**self.auth, **(headers or {})})
        error_shape(post(b'{"messages": ['), 400)
        error_shape(post(b'\xff\xfe not json'), 400)
        error_shape(post(json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})),
                    404, "model_not_found")
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]})), 400)
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})), 400)
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]})), 400)
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2})), 400)
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": "x"}],
                                     "response_format": {"type": "json_schema", "json_schema": {}}})), 400)
        error_shape(post(json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9})),
                    400, "context_length_exceeded")
        big = json.dumps({"messages": [{"role": "user", "content": "x" * (self.a.max_request_bytes + 10)}]})
        error_shape(post(big), 413, "request_too_large")
        error_shape(self.http.post("/v1/chat/completions", json={"messages": []},
                                   headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        error_shape(self.http.post("/v1/chat/completions", json={"messages": []}), 401, "invalid_api_key")
        try:
            openai.OpenAI(base_url=self.a.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
            raise AssertionError("a wrong key listed the models")
        except openai.AuthenticationError:
            pass
        try:
            self.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            raise AssertionError("an unknown model answered")
        except openai.NotFoundError:
            pass
        error_shape(self.http.get("/no/such/route"), 404)
        models = self.client.models.list()
        check([m.id for m in models.data] == [self.a.model], "models")
        h = self.http.get("/health").json()
        check(h["status"] == "ok", str(h))

    def raw_post(self, body):
        """A request sent on a socket of its own, left open and unread (a slow client)."""
        host, port = self.a.base_url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)))
        data = json.dumps(body).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {self.a.api_key}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                  + data)
        return s

    def queue_full(self):
        """--parallel + --max-queue long requests fill the server; the next gets 429 at once, and the
        slots come back when those clients hang up."""
        slots = self.a.parallel + self.a.max_queue
        long = {"model": self.a.model, "messages": [{"role": "user", "content": "Go on forever."}],
                "max_tokens": 3000, "temperature": 1.0, "seed": 1, "stream": True}
        socks = [self.raw_post(long) for _ in range(slots)]
        try:
            deadline = time.time() + 10
            while self.http.get("/health").json()["requests"] < slots:
                check(time.time() < deadline, "the long requests did not all arrive")
                time.sleep(0.05)
            t0 = time.time()
            error_shape(self.http.post("/v1/chat/completions", json=long, headers=self.auth), 429, "queue_full")
            check(time.time() - t0 < 2, "429 took too long")
        finally:
            for s in socks:
                s.close()
        deadline = time.time() + 10
        while self.http.get("/health").json()["requests"] > 0:
            check(time.time() < deadline, "slots of clients that hung up were not freed")
            time.sleep(0.05)

    def batched_equals_alone(self):
        prompts = ["What is 2+2?", "Name three colours.", "Write a haiku about the sea.", "hi",
                   "Translate 'good morning'.", "List planets.", "Capital of France?", "Why is the sky blue?"]
        reqs = [dict(messages=[{"role": "user", "content": p}], seed=100 + i, max_tokens=16 + i,
                     temperature=0.0 if i % 3 == 0 else 0.9, top_p=0.95) for i, p in enumerate(prompts)]
        alone = [self.ask(**r).choices[0].message.content for r in reqs]
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
            together = list(pool.map(lambda r: self.ask(**r).choices[0].message.content, reqs))
        check(together == alone, f"batched answers differ:\n{together}\n{alone}")
        print(f"  8 concurrent requests in {time.time() - t0:.2f} s, each answer equal to its answer alone")

    def cache_equals_nocache(self):
        if not self.a.nocache_url:
            return
        other = openai.OpenAI(base_url=self.a.nocache_url + "/v1", api_key=self.a.api_key, max_retries=0)
        first = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri("large.png")}},
            {"type": "text", "text": "Describe this image."}]}]

        def ttft(client, messages):
            t0 = time.time()
            first_at, text = None, ""
            for chunk in client.chat.completions.create(model=self.a.model, messages=messages, max_tokens=16,
                                                        stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content and first_at is None:
                    first_at = time.time() - t0
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    usage = chunk.usage
            return text, (first_at or time.time() - t0), usage

        answer, t_first, _ = ttft(self.client, first)
        second = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "What colour is the largest shape?"}]
        cached, t_cached, u = ttft(self.client, second)
        fresh, t_fresh, _ = ttft(other, second)
        check(cached == fresh, f"{cached!r} != {fresh!r}")
        check(u.prompt_tokens_details.cached_tokens >= 768, str(u))
        print(f"  follow-up about the same image: TTFT {t_cached * 1e3:.0f} ms with the cache, "
              f"{t_fresh * 1e3:.0f} ms without, first turn {t_first * 1e3:.0f} ms; "
              f"{u.prompt_tokens_details.cached_tokens} of {u.prompt_tokens} prompt tokens reused")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--nocache-url")
    p.add_argument("--max-request-bytes", type=int, required=True)
    p.add_argument("--parallel", type=int, required=True)
    p.add_argument("--max-queue", type=int, required=True)
    a = p.parse_args()
    c = Checks(a)
    whole = c.non_streaming()
    steps = [
        ("non-streaming", lambda: None),
        ("streaming reassembles to the whole answer", lambda: c.streaming_equals_whole(whole)),
        ("image as data URI, system and multi-turn", c.image_and_turns),
        ("logprobs", c.logprobs),
        ("fields real clients send", c.accepted_fields),
        ("errors: status and shape", c.errors),
        ("queue full: 429", c.queue_full),
        ("batched equals alone", c.batched_equals_alone),
        ("cache equals no cache", c.cache_equals_nocache),
    ]
    for name, f in steps:
        t0 = time.time()
        f()
        print(f"ok {name} ({time.time() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
