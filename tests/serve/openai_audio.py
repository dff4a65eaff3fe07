#!/usr/bin/env python3
"""Speech through `edgevlm serve --speech-model` with the official `openai` package (started by
crates/edgevlm-cli/tests/serve.rs, or by hand):

    python tests/serve/openai_audio.py --base-url http://127.0.0.1:PORT --api-key KEY --model NAME \
        --expect "What color is the car park next to the red house?" --bare-url http://127.0.0.1:PORT2

`/v1/audio/transcriptions` in every response format, its errors (status and OpenAI's error shape), and
a chat request whose user content is an `input_audio` part: the same answer as the transcript typed.
"""
import argparse
import base64
import sys
from pathlib import Path

import httpx2 as httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "tests" / "fixtures" / "audio" / "q16k.wav"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def error_shape(e, status, param=None):
    check(e.status_code == status, f"status {e.status_code} != {status}: {e.body}")
    err = e.body if "message" in e.body else e.body.get("error", {})
    check(set(err) == {"message", "type", "param", "code"}, f"error keys {sorted(err)}")
    if param is not None:
        check(err["param"] == param, f"param {err['param']!r} != {param!r}")


def expect_error(f, status, param=None):
    try:
        f()
    except openai.APIStatusError as e:
        error_shape(e, status, param)
        return
    raise AssertionError(f"no error (expected {status})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--bare-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--expect", required=True)
    a = p.parse_args()
    c = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.api_key)

    def transcribe(**kw):
        return c.audio.transcriptions.create(model="whisper-1", file=CLIP.open("rb"), **kw)

    r = transcribe()
    check(r.text == a.expect, f"json text {r.text!r}")
    check(transcribe(response_format="text") == a.expect + "\n", "text format")
    v = transcribe(response_format="verbose_json", language="en")
    check(v.language == "en" and abs(v.duration - 3.5) < 0.2, f"verbose_json {v.language} {v.duration}")
    check(len(v.segments) == 1 and v.segments[0].start == 0.0 and 2.0 < v.segments[0].end <= 4.0,
          f"segments {v.segments}")
    check(v.segments[0].text.strip() == a.expect, "segment text")
    srt = transcribe(response_format="srt")
    check(srt.startswith("1\n00:00:00,000 --> 00:00:0") and a.expect in srt, f"srt {srt!r}")
    vtt = transcribe(response_format="vtt")
    check(vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and a.expect in vtt, f"vtt {vtt!r}")
    print("ok transcriptions: json, text, verbose_json, srt, vtt")

    expect_error(lambda: c.audio.transcriptions.create(model="whisper-9", file=CLIP.open("rb")), 404, "model")
    expect_error(lambda: transcribe(response_format="mp3"), 400, "response_format")
    expect_error(lambda: transcribe(temperature=3), 400, "temperature")
    expect_error(lambda: transcribe(language="xx"), 400)
    expect_error(lambda: c.audio.transcriptions.create(model="whisper-1", file=("q.wav", b"RIFF\x00\x00\x00\x00WAVEjunk")), 400)
    expect_error(lambda: c.audio.transcriptions.create(model="whisper-1", file=("q.mp3", b"ID3\x03\x00\x00" + b"\x00" * 64)), 400)
    raw = httpx.post(a.base_url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {a.api_key}"},
                     data={"model": "whisper-1"}, files={"nofile": ("x", b"1")})
    check(raw.status_code == 400 and raw.json()["error"]["param"] == "file", f"no file: {raw.text}")
    bare = openai.OpenAI(base_url=a.bare_url + "/v1", api_key=a.api_key)
    expect_error(lambda: bare.audio.transcriptions.create(model="whisper-1", file=CLIP.open("rb")), 404)
    print("ok transcription errors: status and shape")

    audio = base64.b64encode(CLIP.read_bytes()).decode()
    spoken = c.chat.completions.create(model=a.model, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}])
    typed = c.chat.completions.create(model=a.model, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": a.expect}]}])
    check(spoken.choices[0].message.content == typed.choices[0].message.content, "spoken != typed answer")
    check(spoken.usage.prompt_tokens == typed.usage.prompt_tokens, "prompt tokens differ")
    expect_error(lambda: c.chat.completions.create(model=a.model, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "mp3"}}]}]), 400)
    expect_error(lambda: bare.chat.completions.create(model=a.model, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}]), 400)
    print("ok chat with an input_audio part answers as the typed question")
    return 0


if __name__ == "__main__":
    sys.exit(main())
