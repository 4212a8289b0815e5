"""Every refusal is an OpenAI-style error `{"error": {message, type, param, code}}` with the right status,
never a 500 with a traceback: 401, 404, 400 (malformed JSON, bad fields named, limits), 413, 429, 500."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serve_helpers import API_KEY, Gate, load_tiny, run_server, served, tiny_dirs, wait_for  # noqa: F401

from lorakit.infer import Engine
from lorakit.serve import ServeLimits, create_app


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return body


@pytest.fixture(scope="module")
def keyed(served):
    app = create_app(served.engine, served.tokenizer, base_name="tiny-llama", adapter_dir=served.root,
                     api_key=API_KEY, limits=ServeLimits(max_prompt_tokens=64, max_tokens=32))
    with run_server(app) as url:
        yield url


ROUTES = [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
          ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/alpha"), ("GET", "/nope"), ("GET", "//health"),
          ("GET", "/health/")]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("key", [None, "wrong", API_KEY + "x", API_KEY[:-1]], ids=["none", "wrong", "longer", "prefix"])
def test_every_route_but_health_needs_the_key(keyed, method, path, key):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    r = httpx.request(method, keyed + path, headers=headers, json={})
    body = _error(r, 401)
    assert body["code"] == "invalid_api_key" and API_KEY not in r.text


@pytest.mark.parametrize("target", ["/v1/../health", "/V1/models", "/v1/%2e%2e/health", "http://x/health"])
def test_unnormalized_paths_do_not_bypass_the_key(keyed, target):
    """Sent raw (httpx would normalise them): the exemption is for exactly GET /health."""
    import socket

    host, port = keyed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x/health?\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status in (400, 401), reply[:200]


def test_health_is_open_and_the_key_works(keyed):
    assert httpx.get(keyed + "/health").status_code == 200
    client = openai.OpenAI(base_url=keyed + "/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices
    # closed by `with`: the raised error's traceback holds the client in a cycle that the garbage collector would
    # free later, its socket first (a ResourceWarning in whichever test is running then)
    with openai.OpenAI(base_url=keyed + "/v1", api_key="nope", max_retries=0) as refused:
        with pytest.raises(openai.AuthenticationError):
            refused.models.list()


def test_unknown_model_is_404_model_not_found(served):
    with served.client() as client, pytest.raises(openai.NotFoundError) as err:  # closed: see above
        client.completions.create(model="gpt-9", prompt="hi")
    assert err.value.body["code"] == "model_not_found"
    body = _error(httpx.post(served.url + "/v1/chat/completions",
                             json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert body["param"] == "model"
    _error(httpx.get(served.url + "/no/such/route"), 404)


MALFORMED = {"truncated": b'{"model": "tiny-llama", "prompt": "hi"', "not_json": b"hello", "array": b"[1, 2]",
             "nan": b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}',
             "deep": b"[" * 100_000 + b"]" * 100_000, "bad_utf8": b'{"prompt": "\xff"}'}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_400(served, raw):
    r = httpx.post(served.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    _error(r, 400)


BAD_FIELDS = {
    "max_tokens_string": ({"max_tokens": "5"}, "max_tokens"),
    "max_tokens_zero": ({"max_tokens": 0}, "max_tokens"),
    "temperature_negative": ({"temperature": -1}, "temperature"),
    "top_p_zero": ({"top_p": 0}, "top_p"),
    "n_zero": ({"n": 0}, "n"),
    "n_too_many": ({"n": 17}, "n"),
    "penalty_out_of_range": ({"presence_penalty": 2.5}, "presence_penalty"),
    "logprobs_too_many": ({"logprobs": 6}, "logprobs"),
    "five_stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "unknown_field": ({"logit_bias": {"1": 5}}, "logit_bias"),
    "prompt_list": ({"prompt": ["a", "b"]}, "prompt"),
    "stream_string": ({"stream": "yes"}, "stream"),
}


@pytest.mark.parametrize("extra,param", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_are_400_naming_the_field(served, extra, param):
    body = {"model": "tiny-llama", "prompt": "hi", **extra}
    err = _error(httpx.post(served.url + "/v1/completions", json=body), 400)
    assert err["param"] == param and param in err["message"]


def test_missing_and_bad_chat_fields(served):
    assert _error(httpx.post(served.url + "/v1/completions", json={"model": "tiny-llama"}), 400)["param"] == "prompt"
    bad_role = {"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}
    assert _error(httpx.post(served.url + "/v1/chat/completions", json=bad_role), 400)["param"] == "messages.0.role"
    with served.client() as client, pytest.raises(openai.BadRequestError):  # closed: see above
        client.completions.create(model="tiny-llama", prompt="hi", n=99)


# Raw JSON bodies holding the escape \ud800 (a lone UTF-16 surrogate): json.loads accepts it, a tokenizer or
# the UTF-8 encoder of a reply quoting it does not. Each must be a 400 naming the field.
SURROGATE = "\\ud800"
LONE_SURROGATES = {
    "completion_prompt": ("/v1/completions", f'{{"model": "tiny-llama", "prompt": "hi {SURROGATE}"}}', "prompt"),
    "chat_content": ("/v1/chat/completions",
                     f'{{"model": "tiny-llama", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
                     "messages.0.content"),
    "chat_content_part": ("/v1/chat/completions",
                          '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}, '
                          '{"role": "assistant", "content": "yes"}, {"role": "user", "content": '
                          f'[{{"type": "text", "text": "a"}}, {{"type": "text", "text": "b{SURROGATE}c"}}]}}]}}',
                          "messages.2.content.1.text"),
    "stop_string": ("/v1/completions", f'{{"model": "tiny-llama", "prompt": "hi", "stop": "{SURROGATE}"}}', "stop"),
    "stop_list": ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
                  f'"stop": ["x", "{SURROGATE}"]}}', "stop.1"),
    "model": ("/v1/completions", f'{{"model": "tiny{SURROGATE}", "prompt": "hi"}}', "model"),
    "user": ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
             f'"user": "{SURROGATE}"}}', "user"),
    "role": ("/v1/chat/completions", f'{{"model": "tiny-llama", "messages": [{{"role": "{SURROGATE}", '
             '"content": "hi"}]}', "messages.0.role"),
    "adapter_name": ("/v1/adapters", f'{{"name": "a{SURROGATE}"}}', "name"),
    "field_name": ("/v1/completions", f'{{"model": "tiny-llama", "prompt": "hi", "x{SURROGATE}": 1}}', None),
}


@pytest.mark.parametrize("path,raw,param", LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_a_lone_surrogate_in_any_string_is_400_naming_the_field(served, path, raw, param):
    r = httpx.post(served.url + path, content=raw.encode("ascii"), headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"]
    if param:
        assert err["message"].startswith(param + ":")
    # a valid surrogate pair (an emoji, written as the escapes) is still text and is served
    ok = httpx.post(served.url + "/v1/completions", content=b'{"model": "tiny-llama", "prompt": "hi \\ud83d\\ude00", '
                    b'"max_tokens": 2}', headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_limits_long_prompt_and_max_tokens_are_400(served):
    err = _error(httpx.post(served.url + "/v1/completions",
                            json={"model": "tiny-llama", "prompt": "hello world " * 100}), 400)
    assert err["code"] == "context_length_exceeded" and "64" in err["message"]
    err = _error(httpx.post(served.url + "/v1/completions",
                            json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 33}), 400)
    assert err["param"] == "max_tokens" and "32" in err["message"]
    err = _error(httpx.post(served.url + "/v1/chat/completions",
                            json={"model": "tiny-llama", "max_completion_tokens": 1000,
                                  "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert err["param"] == "max_completion_tokens"


def test_the_engines_tighter_limits_get_the_same_400_as_the_apps(served):
    """One limit check (infer.sampling.RequestLimits) serves both layers: an app whose limits are looser than its
    engine's (64 prompt tokens, 32 new) answers the engine's refusal as it answers its own."""
    app = create_app(served.engine, served.tokenizer, base_name="tiny-llama",
                     limits=ServeLimits(max_prompt_tokens=4096, max_tokens=1000))
    with run_server(app) as url:
        err = _error(httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 100}),
                     400)
        assert err == {"message": "max_tokens is 100; this server allows at most 32.", "type": "invalid_request_error",
                       "param": "max_tokens", "code": "invalid_value"}
        err = _error(httpx.post(url + "/v1/chat/completions", json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hello world " * 100}], "max_tokens": 4}), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        assert err["message"].startswith("This server's maximum prompt length is 64 tokens; the prompt has ")


def test_body_over_one_mib_is_413(served):
    big = b'{"model": "tiny-llama", "prompt": "' + b"a" * (1 << 20) + b'"}'
    _error(httpx.post(served.url + "/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunked():  # no Content-Length: counted while read
        yield big[:1000]
        yield big[1000:]

    _error(httpx.post(served.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
           413)


@pytest.mark.parametrize("size", [20 * 1024, 64 * 1024], ids=["20KiB", "64KiB"])
def test_request_headers_over_16_kib_are_431(served, size):
    """A head that arrives whole (one write) is parsed by h11 whatever its size; the guard measures it."""
    from lorakit.serve.guard import MAX_HEADER_BYTES

    assert MAX_HEADER_BYTES == 16 * 1024
    err = _error(httpx.get(served.url + "/v1/models", headers={"x-big": "a" * size}), 431)
    assert err["code"] == "request_header_fields_too_large" and "16384" in err["message"]
    split = {f"x-{i}": "b" * 1000 for i in range(size // 1000)}  # many headers add up the same way
    _error(httpx.get(served.url + "/v1/models", headers=split), 431)
    _error(httpx.get(served.url + "/v1/models?" + "q" * (20 * 1024)), 431)  # and so does the request line
    assert httpx.get(served.url + "/v1/models", headers={"x-fine": "a" * 8 * 1024}).status_code == 200


def test_a_head_still_arriving_past_16_kib_is_refused_by_h11(served):
    """h11's own limit (uvicorn's h11_max_incomplete_event_size) answers before the head is complete."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(served.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024))  # no blank line yet
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.split(b" ")[1] in (b"400", b"431"), reply[:200]


def test_no_chat_template_is_a_clear_400(served):
    from data_helpers import build_tokenizer

    app = create_app(served.engine, build_tokenizer(), base_name="tiny-llama", limits=ServeLimits(max_tokens=32))
    with run_server(app) as url:
        err = _error(httpx.post(url + "/v1/chat/completions",
                                json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert err["code"] == "no_chat_template" and "/v1/completions" in err["message"]


def test_queue_full_is_429_and_admitted_requests_finish(tiny_dirs):
    base, _, _ = tiny_dirs
    loaded = load_tiny(base)
    gate = Gate(loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_queue=1, max_prompt_tokens=64,
                    max_new_tokens=8)
    engine.start()
    app = create_app(engine, loaded.tokenizer, base_name="tiny-llama", limits=ServeLimits(max_prompt_tokens=64,
                                                                                          max_tokens=8))
    results: dict[int, httpx.Response] = {}
    try:
        with run_server(app) as url:
            gate.open.clear()  # the engine thread stops in the first forward

            def send(i):
                results[i] = httpx.post(url + "/v1/completions", timeout=60,
                                        json={"model": "tiny-llama", "prompt": "hello world", "max_tokens": 4})

            threads = [threading.Thread(target=send, args=(0,))]
            threads[0].start()
            wait_for(lambda: gate.calls >= 1)  # request 0 is running (held in prefill)
            threads.append(threading.Thread(target=send, args=(1,)))
            threads[1].start()
            wait_for(lambda: engine.metrics()["queue_length"] == 1)  # request 1 waits
            send(2)  # the queue is full
            err = _error(results[2], 429)
            assert err["code"] == "queue_full" and results[2].headers["retry-after"] == "1"
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:  # closed: see above
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
            gate.open.set()
            for t in threads:
                t.join(timeout=60)
            assert results[0].status_code == 200 and results[1].status_code == 200
    finally:
        gate.remove()
        engine.close()


class _BrokenEngine:
    """An engine whose submit fails unexpectedly: the client must get a generic 500, not the exception."""

    def __init__(self, engine):
        self.engine = engine

    def adapters(self):
        return []

    def metrics(self):
        return {}

    def submit(self, *args):
        raise RuntimeError("secret detail /home/op/models")


def test_internal_error_is_a_generic_500(served):
    app = create_app(_BrokenEngine(served.engine), served.tokenizer, base_name="tiny-llama",
                     limits=ServeLimits(max_tokens=32))
    with run_server(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "hi"})
    err = _error(r, 500)
    assert "secret" not in r.text and err["type"] == "internal_error"
