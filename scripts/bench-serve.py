#!/usr/bin/env python3
"""Serving side by side: `edgevlm serve` against llama.cpp's `llama-server` (the build of
scripts/build-llamacpp.sh, `-np N -cb`), same weights, same threads, alternated in one run.

For 1, 2, 4 and 8 concurrent streaming clients: aggregate decode tokens/s (every stream's tokens after
its first, over the span from the earliest first token to the latest last one) and p50/p95 time to
first token. Models: SmolLM2-135M-Instruct Q4_0 (text), and the full-size random SmolVLM-256M with a
4-bit text decoder and an image per request (edgevlm `--quant q4 --skip-vision`; llama.cpp Q4_0 text
plus its F16 mmproj), each stream its own image. Then the follow-up question: the same image, a second
turn, time to first token against the first turn's.

    python3 scripts/bench-serve.py [--threads 2] [--streams 1,2,4,8] [--models smollm2,smolvlm] [--check-batched]

Needs `cargo build --release -p edgevlm-cli`, scripts/build-llamacpp.sh, scripts/setup-python.sh (the
SmolVLM conversion) and the clients' httpx2 (scripts/setup-clients.sh). Prints a markdown table.
"""
import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
import struct
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bvl", ROOT / "scripts" / "bench-vs-llamacpp.py")
bvl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bvl)

# Aggregate decode tokens/s is measured over the stretch when every stream is decoding (after the last
# one's first token, before the first one's last token); time to first token over every stream.
STORY = ("Write a long story about a lighthouse keeper who finds a message in a bottle, "
         "with many details about the sea, the weather and the people of the village.")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(width, height, seed):
    """A smooth synthetic image, different per seed (so the reuse cache cannot share it)."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += bytes(((x * 255 // width + seed * 37) % 256, (y * 255 // height + seed * 11) % 256,
                          ((x + y + seed) * 3) % 256))
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


class Server:
    def __init__(self, name, cmd, port, model_name):
        self.name, self.port, self.model = name, port, model_name
        self.log = open(f"/tmp/bench-serve-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                sys.exit(f"{name} did not start: see /tmp/bench-serve-{name}.log")
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_one(url, body, out, texts=None):
    """One streaming request: (send time, text-chunk times, tokens) into `out`, its text into `texts`.
    Tokens are the usage's count, else the number of text chunks."""
    t0 = time.time()
    times = []
    tokens = 0
    text = ""
    with httpx.Client(timeout=600) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.append(RuntimeError(f"{r.status_code}: {r.read()[:300]}"))
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.time())
                    text += chunk["choices"][0]["delta"]["content"]
    out.append((t0, times, tokens or len(times)))
    if texts is not None:
        texts.append(text)


def run_concurrent(server, bodies):
    out, threads = [], []
    for b in bodies:
        t = threading.Thread(target=stream_one, args=(server.url, b, out))
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in out if isinstance(o, Exception)]
    if errors:
        sys.exit(f"{server.name}: {errors[0]}")
    ttft = [times[0] - s for s, times, _ in out]
    # Decode throughput while every stream is decoding: from the last stream's first token to the
    # first stream's last token (prompt passes, image encoding included, fall outside it).
    start = max(times[0] for _, times, _ in out)
    end = min(times[-1] for _, times, _ in out)
    common = end - start >= 0.5
    if not common:
        # No common stretch (a server that starts answering before every prompt is in finishes some
        # answers before the last prompt pass): every stream's tokens after its first over the whole
        # span, prompt passes included. Marked in the table: not a decode rate.
        start = min(times[0] for _, times, _ in out)
        end = max(times[-1] for _, times, _ in out)
        decoded = sum(n - 1 for _, _, n in out)
    else:
        # Tokens per text chunk as the usage counted them, chunks inside the stretch.
        decoded = sum(n / len(times) * sum(start < t <= end for t in times) for _, times, n in out)
    return decoded / max(end - start, 1e-9), ttft, common


def request(model, content, max_tokens, seed):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}


def image_content(png, text):
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def follow_up(server, png, max_tokens):
    """Time to first token of a first turn about an image, and of a second turn about it."""
    first = [{"role": "user", "content": image_content(png, "Describe this image.")}]
    opts = {"model": server.model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out, texts = [], []
    stream_one(server.url, {**opts, "messages": first, "max_tokens": max_tokens}, out, texts)
    s1, times1, _ = out[0]
    second = first + [{"role": "assistant", "content": texts[0]},
                      {"role": "user", "content": "What colour is in the top left corner?"}]
    stream_one(server.url, {**opts, "messages": second, "max_tokens": 8}, out)
    s2, times2, _ = out[1]
    return times1[0] - s1, times2[0] - s2


def check_batched(cmd, bodies, n):
    """edgevlm only: `n` concurrent requests (their own prompts, images and seeds) against each alone,
    with the reuse cache off so that every request does all its work. Exits if any answer differs."""
    port = free_port()
    srv = Server("edgevlm-check", [*map(str, cmd), "--port", str(port), "--parallel", str(n),
                                   "--cache-mb", "0"], port, "m")
    try:
        alone = []
        for b in bodies:
            out = []
            stream_one(srv.url, b, out, alone)
        together, out, threads = [None] * n, [], []
        for i, b in enumerate(bodies):
            def one(i=i, b=b):
                texts = []
                stream_one(srv.url, b, out, texts)
                together[i] = texts[0] if texts else None
            threads.append(threading.Thread(target=one))
            threads[-1].start()
        for t in threads:
            t.join()
    finally:
        srv.stop()
    same = sum(a == t for a, t in zip(alone, together))
    if same != n:
        sys.exit(f"batched answers differ from alone: {same} of {n} equal\n{together}\n{alone}")
    return f"{n} concurrent requests (each its own prompt, seed 0..{n - 1} and image where the model takes one) each equal to its answer alone"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--models", default="smollm2,smolvlm")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--edgevlm-args", default="")
    p.add_argument("--check-batched", action="store_true",
                   help="first check that edgevlm's answers at the top stream count equal each alone")
    a = p.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    top = max(streams)
    bin_dir = Path(bvl.sh(["bash", ROOT / "scripts" / "build-llamacpp.sh"]).strip())
    edgevlm = ROOT / "target" / "release" / "edgevlm"
    if not edgevlm.exists():
        sys.exit("build edgevlm first: cargo build --release -p edgevlm-cli")
    env_threads = ["--threads", str(a.threads)]
    rows = []
    for model in a.models.split(","):
        if model == "smollm2":
            gguf = bvl.ensure_models(bin_dir, ["Q4_0"])["Q4_0"]
            ours = [edgevlm, "serve", "--model", gguf, "--served-model-name", "m", *env_threads]
            theirs = [bin_dir / "llama-server", "-m", gguf, "-t", str(a.threads), "-tb", str(a.threads)]
            ctx = 2048
            bodies = lambda n, first=0: [request("m", STORY, a.gen_tokens, i) for i in range(n)]  # noqa: E731
            image = None
        else:
            folder, text, mmproj, _ = bvl.ensure_vlm(bin_dir, "smolvlm", "Q4_0")
            ours = [edgevlm, "serve", "--model", folder, "--served-model-name", "m", "--quant", "q4",
                    "--skip-vision", *env_threads]
            theirs = [bin_dir / "llama-server", "-m", text, "--mmproj", mmproj, "-t", str(a.threads),
                      "-tb", str(a.threads)]
            ctx = 4096
            # One image per stream, and another for the warm-up: no request finds its image cached.
            pngs = [png_bytes(512, 384, i) for i in range(top + 1)]
            bodies = lambda n, first=0: [  # noqa: E731
                request("m", image_content(pngs[first + i], "Describe this image."), a.gen_tokens, i)
                for i in range(n)]
            image = png_bytes(512, 384, 99)
        if a.check_batched:
            checks = bodies(top)
            for b in checks:
                b["max_tokens"] = 24
            verdict = check_batched([*ours, *a.edgevlm_args.split()], checks, top)
            print(f"{model}: {verdict}", file=sys.stderr)
            rows.append((model, "batched check", verdict))
        results = {}
        for n in streams:
            for rnd in range(a.rounds):
                order = [("edgevlm", ours), ("llama.cpp", theirs)]
                if rnd % 2:
                    order.reverse()
                for name, cmd in order:
                    port = free_port()
                    if name == "edgevlm":
                        full = [*map(str, cmd), "--port", str(port), "--parallel", str(n), "--max-queue", "64",
                                *a.edgevlm_args.split()]
                    else:
                        full = [*map(str, cmd), "--port", str(port), "-np", str(n), "-cb", "-c", str(ctx * n),
                                "--no-webui", "--alias", "m"]
                    srv = Server(name, full, port, "m")
                    try:
                        run_concurrent(srv, bodies(1, top))  # warm-up
                        rate, ttft, common = run_concurrent(srv, bodies(n))
                        r = results.setdefault((name, n), {"rate": [], "ttft": [], "span": False})
                        r["rate"].append(rate)
                        r["ttft"].extend(ttft)
                        r["span"] |= not common
                        if image is not None and n == streams[0] and rnd == 0:
                            r["follow_up"] = follow_up(srv, image, 32)
                    finally:
                        srv.stop()
                print(f"{model} {n} streams round {rnd + 1}: "
                      + ", ".join(f"{k} {statistics.median(results[(k, n)]['rate']):.1f} tok/s"
                                  for k in ("edgevlm", "llama.cpp")), file=sys.stderr)
        for n in streams:
            e, l = results[("edgevlm", n)], results[("llama.cpp", n)]
            rows.append((model, n, statistics.median(e["rate"]), statistics.median(l["rate"]),
                         pct(e["ttft"], 50), pct(e["ttft"], 95), pct(l["ttft"], 50), pct(l["ttft"], 95),
                         e["span"], l["span"]))
            for name, r in (("edgevlm", e), ("llama.cpp", l)):
                if "follow_up" in r:
                    t1, t2 = r["follow_up"]
                    print(f"{model} follow-up TTFT, {name}: first turn {t1 * 1e3:.0f} ms, "
                          f"second turn {t2 * 1e3:.0f} ms", file=sys.stderr)
                    rows.append((model, f"follow-up {name}", t1, t2))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\n{cpu}, {a.threads} threads, {a.gen_tokens} tokens per stream, {a.rounds} rounds alternated\n")
    print("| model | streams | edgevlm decode tok/s (all) | llama-server | ratio | edgevlm TTFT p50 / p95 ms | "
          "llama-server TTFT p50 / p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if isinstance(row[1], int):
            m, n, er, lr, e50, e95, l50, l95, es, ls = row
            mark = lambda span: "*" if span else ""  # noqa: E731
            print(f"| {m} | {n} | {er:.1f}{mark(es)} | {lr:.1f}{mark(ls)} | {er / lr:.2f} | "
                  f"{e50 * 1e3:.0f} / {e95 * 1e3:.0f} | {l50 * 1e3:.0f} / {l95 * 1e3:.0f} |")
    if any(isinstance(row[1], int) and (row[8] or row[9]) for row in rows):
        print("\n\\* no stretch with every stream decoding (answers finished before the last prompt "
              "pass): tokens over the whole span, prompt passes included, not a decode rate")
    for row in rows:
        if len(row) == 3:
            print(f"- {row[0]}: {row[2]}")
        elif not isinstance(row[1], int):
            m, what, t1, t2 = row
            print(f"- {m} {what}: time to first token, first turn {t1 * 1e3:.0f} ms, follow-up about the "
                  f"same image {t2 * 1e3:.0f} ms ({t2 / t1 * 100:.1f}% of the first)")


if __name__ == "__main__":
    main()
