"""`meshpar serve` (meshpar/serve/server.py) at tp2, through the official openai client:
the text `meshpar generate` gives, greedy and sampled; 16 concurrent streams give the
texts of one request at a time; bad requests get 4xx with OpenAI's error body and the
next request is served; SIGTERM lets a running stream finish and stops every rank."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from test_generate import trained  # noqa: F401 - the checkpoint served (a fixture)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
psutil = pytest.importorskip("psutil")

NAME = "run"  # the served model: the checkpoint folder's name


@pytest.fixture(scope="module")
def server(trained):  # noqa: F811
    from meshpar.train.launch import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "meshpar", "serve", "--checkpoint", str(trained), "--tp", "2",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                assert json.load(response) == {"status": "ok"}
                break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
    yield port, process
    if process.poll() is None:
        process.kill()
        process.wait()


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def cli_generate(trained, prompt, *flags) -> dict:  # noqa: F811
    """`meshpar generate --json` on one device, in this process."""
    import contextlib
    import io

    from meshpar.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", "--checkpoint", str(trained), "--prompt", prompt, "--json", *flags]) == 0
    return json.loads(out.getvalue())


def test_the_openai_client_gets_generates_text(server, trained):  # noqa: F811
    port, _ = server
    api = client(port)
    assert [m.id for m in api.models.list().data] == [NAME]
    for prompt, sampling, flags in [("def main(", dict(temperature=0), ["--max-new-tokens", "12"]),
                                    ("import os", dict(temperature=0.9, seed=7),
                                     ["--max-new-tokens", "12", "--temperature", "0.9", "--seed", "7"])]:
        ours = cli_generate(trained, prompt, *flags)
        answer = api.completions.create(model=NAME, prompt=prompt, max_tokens=12, **sampling)
        assert answer.choices[0].text == ours["text"] and answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens == len(prompt)


PROMPTS = [f"request {i}: " + "abc " * (i % 5) for i in range(16)]


def stream_text(api, prompt: str, seed: int) -> tuple[str, str]:
    text, reason = "", None
    for event in api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0.9, seed=seed,
                                        stream=True):
        text += event.choices[0].text
        reason = event.choices[0].finish_reason or reason
    return text, reason


def test_concurrent_streams_give_the_texts_of_one_at_a_time(server):
    """16 streams at once over 8 cache slots (they join and leave the batch between decode
    steps), each sampled from its own seed: each stream's text is the text of its request
    served alone."""
    port, _ = server
    api = client(port)
    alone = [api.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0.9, seed=i).choices[0].text
             for i, p in enumerate(PROMPTS)]
    together: list = [None] * len(PROMPTS)

    def one(i):
        together[i] = stream_text(client(port), PROMPTS[i], i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [t for t, _ in together] == alone and {r for _, r in together} == {"length"}
    assert len(set(alone)) > 8  # the texts differ: rows were not mixed up unnoticed


def post(port, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "run", "prompt": "' + b"x" * 250 + b'", "max_tokens": 10}', 400, "maximum context length is 256"),
    (b'{"model": "run", "prompt": "x", "max_tokens": -1}', 400, "'max_tokens' must be at least 1"),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "the model 'gpt-4' does not exist"),
    (b'{"model": "run", "prompt": "x", ', 400, "not valid JSON"),
    (b'{"model": "run", "prompt": "x", "temperature": "hot"}', 400, "'temperature' must be a number"),
], ids=["too-long", "negative-max-tokens", "unknown-model", "malformed-json", "bad-temperature"])
def test_a_bad_request_gets_an_error_and_the_next_is_served(server, body, status, message):
    port, _ = server
    code, answer = post(port, body)
    assert code == status and message in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    code, answer = post(port, b'{"model": "run", "prompt": "x", "max_tokens": 3, "stop": ["zz"]}')
    assert code == 200 and answer["usage"]["completion_tokens"] <= 3


def test_the_openai_client_raises_for_a_bad_request(server):
    port, _ = server
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(port).completions.create(model=NAME, prompt="x" * 250, max_tokens=10)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(port).completions.create(model="other", prompt="x")


def test_sigterm_finishes_the_running_stream_and_stops_every_rank(server):
    """Last in this file: the server goes."""
    port, process = server
    ranks = psutil.Process(process.pid).children(recursive=True)
    started, result = threading.Event(), {}

    def long_stream():
        text = ""
        stream = client(port).completions.create(model=NAME, prompt="long", max_tokens=120, temperature=0.9,
                                                 seed=1, stream=True)
        for event in stream:
            started.set()
            text += event.choices[0].text
            result["reason"] = event.choices[0].finish_reason or result.get("reason")
        result["text"] = text

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    process.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert result.get("reason") == "length"  # the stream ran to its end
    assert process.wait(timeout=60) == 0
    assert "meshpar serve: stopped" in process.stderr.read()
    psutil.wait_procs(ranks, timeout=30)
    assert not [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
