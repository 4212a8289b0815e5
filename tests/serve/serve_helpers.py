"""Shared pieces of the server tests: a tiny llama saved with a real tokenizer and chat template, adapters
saved next to it, and a uvicorn server run in a thread on 127.0.0.1 (a free port) for the real client.

A plain module (not conftest.py) so test files import it by name, like tests/tiny_models.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
from data_helpers import CHATML_JINJA, build_tokenizer
from tiny_models import randomize_lora

from lorakit import LoraConfig, wrap
from lorakit.base_model import load_base_model
from lorakit.config import ModelConfig

API_KEY = "sk-test-0123456789"
PROMPTS = ["hello world, how are you", "What is two plus two?", "The quick brown fox", "say hi"]


def save_tiny_base(directory: Path) -> Path:
    """A 2-layer llama whose vocabulary is the chatml test tokenizer's, saved with that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(CHATML_JINJA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def load_tiny(directory: Path):
    return load_base_model(ModelConfig(name_or_path=str(directory), dtype="float32", device="cpu"))


def save_adapters(base_dir: Path, root: Path, seeds: dict[str, int]) -> None:
    """One adapter per name under root/<name>, with random (non-zero) A and B so it changes the output."""
    for name, seed in seeds.items():
        loaded = load_tiny(base_dir)
        lora = wrap(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]), name)
        randomize_lora(lora, seed=seed, scale=0.5)
        lora.save_adapter(root, [name])  # a non-default adapter goes to root/<name>/


def make_bin_only(root: Path, source: str, name: str) -> None:
    """An adapter directory holding adapter_model.bin instead of safetensors (a pickle: must be refused)."""
    target = root / name
    target.mkdir()
    (target / "adapter_config.json").write_text((root / source / "adapter_config.json").read_text())
    (target / "adapter_model.bin").write_bytes(b"not really a pickle")


@contextlib.contextmanager
def run_server(app):
    """Serve `app` with uvicorn (h11, as `lorakit serve` does) on a free loopback port; yields the base URL."""
    import uvicorn

    from lorakit.serve.server import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, "127.0.0.1", port)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def greedy(engine, tokenizer, prompt: str, adapter: str | None, max_tokens: int, *, chat: bool = False):
    """The engine's own greedy output for a prompt submitted alone: (text, finish_reason, usage)."""
    from lorakit.infer import SamplingParams

    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return engine.submit(list(ids), adapter, SamplingParams(max_tokens=max_tokens)).result(timeout=60)


class Gate:
    """A forward pre-hook on the model that holds the engine thread while closed (or slows every step)."""

    def __init__(self, model, delay: float = 0.0):
        self.open = threading.Event()
        self.open.set()
        self.delay = delay
        self.calls = 0
        self._hook = model.register_forward_pre_hook(self._wait)

    def _wait(self, *_):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        self.open.wait(timeout=30)

    def remove(self):
        self.open.set()
        self._hook.remove()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def metrics(base_url: str, headers: dict | None = None) -> dict:
    return httpx.get(base_url + "/metrics", headers=headers or {}).json()


def sse_events(lines) -> list:
    """Decode `data: ...` lines of an SSE body into JSON objects; '[DONE]' stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- fixtures (test modules import them by name) ----------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(base model dir, adapter root with alpha and beta, an outside dir) built once per session."""
    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny_base(tmp / "tiny-llama")
    root = tmp / "adapters"
    root.mkdir()
    save_adapters(base, root, {"alpha": 1, "beta": 2})
    outside = tmp / "outside"
    save_adapters(base, outside, {"evil": 3})
    return base, root, outside


@pytest.fixture(scope="module")
def served(tiny_dirs):
    """A running server over the real Engine: base "tiny-llama", adapter alpha loaded, runtime loads from root."""
    from lorakit.serve.server import ServeOptions, build

    base, root, _ = tiny_dirs
    options = ServeOptions(model=str(base), adapters={"alpha": str(root / "alpha")}, adapter_dir=str(root),
                           dtype="float32", device="cpu", max_batch_size=4, max_queue=64, max_prompt_tokens=64,
                           max_tokens=32)
    engine, app = build(options, log_fn=lambda _: None)
    try:
        with run_server(app) as url:
            yield Served(url, engine, engine.tokenizer, root)
    finally:
        engine.close()


class Served:
    def __init__(self, url, engine, tokenizer, root):
        self.url, self.engine, self.tokenizer, self.root = url, engine, tokenizer, root

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=60, **kw)
