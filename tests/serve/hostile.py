#!/usr/bin/env python3
"""1,000 malformed or hostile requests against a running `edgevlm serve`, bounded and on loopback:
truncated and invalid JSON, invalid UTF-8, wrong types, negative and non-finite numbers, a 50 MB
body, 10,000 images, bad images, slowloris-style partial headers and bodies, and clients that hang
up mid-stream. Every request must get a 4xx or have its connection closed, never a 5xx; the server
must keep answering; its resident memory after the run must be within 10% of before.

    python tests/serve/hostile.py --base-url http://127.0.0.1:PORT --api-key KEY --pid PID
"""
import argparse
import base64
import json
import random
import socket
import sys
import time

import httpx2 as httpx

TOTAL = 1000


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Run:
    def __init__(self, a):
        self.a = a
        host, port = a.base_url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.http = httpx.Client(base_url=a.base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {a.api_key}"})
        self.sent = 0
        self.statuses = {}

    def note(self, status):
        self.sent += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if isinstance(status, int) and status >= 500:
            raise AssertionError(f"a {status} answer")

    def post(self, body, content_type="application/json"):
        r = self.http.post("/v1/chat/completions", content=body, headers={"Content-Type": content_type})
        if r.status_code >= 400:
            err = r.json().get("error", {})
            assert err.get("message"), r.text[:200]
        self.note(r.status_code)
        return r

    def raw(self, data, read=True, hold=0.0):
        """Bytes on a fresh socket; the status line if the server answers, else 'closed'."""
        s = socket.create_connection(self.addr, timeout=30)
        try:
            s.sendall(data)
            if hold:
                time.sleep(hold)
            if not read:
                return "sent"
            reply = s.recv(64)
            if not reply:
                return "closed"
            return int(reply.split()[1])
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            return "closed"
        finally:
            s.close()

    def ok_request(self):
        r = self.http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text[:300]
        return r


def bodies(rng):
    good = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
    text = json.dumps(good).encode()
    tiny_png = base64.b64encode(bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8ffff3f0005fe02fea7d6a4f60000000049454e44ae426082")).decode()
    cases = [
        lambda: text[: rng.randrange(1, len(text))],                      # truncated JSON
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),  # noise, invalid UTF-8
        lambda: b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        lambda: b'{"messages": "no"}',
        lambda: b'{"messages": [{"role": 7}]}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "top_p": -3}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 18446744073709551616}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 5}}',
        lambda: b'{"messages": [{"role": "user", "content": "x"}], "stop": ["", ""]}',
        lambda: b'{"messages": []}',
        lambda: json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + tiny_png[:rng.randrange(8, 60)]}}]}]}).encode(),
        lambda: json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/shadow"}}]}]}).encode(),
        lambda: b"[" * 100_000,                                            # deep nesting
    ]
    while True:
        yield rng.choice(cases)()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--max-request-bytes", type=int, required=True)
    a = p.parse_args()
    r = Run(a)
    rng = random.Random(7)
    for _ in range(3):
        r.ok_request()
    before = rss_kb(a.pid)
    t0 = time.time()

    # A body over the limit, the largest first: 50 MB.
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (50 << 20) + b'"}]}'
    status = r.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   + f"Authorization: Bearer {a.api_key}\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big)
    assert status in (413, "closed"), status
    r.note(status)
    # 10,000 images in one request.
    one = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    resp = r.post(json.dumps({"messages": [{"role": "user", "content": [one] * 10_000}]}).encode())
    assert resp.status_code in (400, 413), resp.status_code
    # Slowloris: partial headers and partial bodies, held open at once, then dropped.
    held = []
    for i in range(20):
        s = socket.create_connection(r.addr, timeout=30)
        if i % 2:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        else:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {a.api_key}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"messa')
        held.append(s)
        r.note("held")
    r.ok_request()  # the server answers others meanwhile
    for s in held:
        s.close()
    # Clients that hang up mid-stream.
    for _ in range(30):
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 500,
                           "stream": True, "temperature": 1.0}).encode()
        s = socket.create_connection(r.addr, timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {a.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        s.recv(256)
        s.close()
        r.note("hung up")
    # Raw protocol garbage.
    for _ in range(20):
        r.note(r.raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) + b"\r\n\r\n"))
    # The rest: malformed request bodies.
    gen = bodies(rng)
    while r.sent < TOTAL:
        resp = r.post(next(gen))
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:200])
    elapsed = time.time() - t0
    # Still serving, and the slots of every hung-up client are free again.
    deadline = time.time() + 20
    while r.http.get("/health").json()["requests"] > 0:
        assert time.time() < deadline, "requests still running after their clients left"
        time.sleep(0.1)
    for _ in range(3):
        r.ok_request()
    after = rss_kb(a.pid)
    growth = (after - before) / before
    print(f"ok {r.sent} hostile requests in {elapsed:.1f} s: {dict(sorted(r.statuses.items(), key=str))}; "
          f"RSS {before / 1024:.1f} MB before, {after / 1024:.1f} MB after ({growth * 100:+.1f}%)")
    assert growth <= 0.10, f"RSS grew {growth * 100:.1f}%"
    return 0


if __name__ == "__main__":
    sys.exit(main())
