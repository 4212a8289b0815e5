"""`lorakit serve` in-process: flags reach the engine and app (uvicorn itself replaced), and a missing
FastAPI/uvicorn is a clear install hint, not an ImportError traceback."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from serve_helpers import tiny_dirs  # noqa: F401

from lorakit.cli import main


def test_serve_builds_the_app_from_flags(tiny_dirs, monkeypatch):
    import uvicorn

    base, root, _ = tiny_dirs
    seen = {}

    def fake_run(self):
        seen["config"] = self.config
        transport = httpx.ASGITransport(app=self.config.app)

        async def check():
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                seen["models"] = (await client.get("/v1/models", headers={"Authorization": "Bearer k"})).json()
                seen["unauth"] = (await client.get("/v1/models")).status_code

        import asyncio

        asyncio.run(check())

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    code = main(["serve", "--model", str(base), "--adapter", f"alpha={root / 'alpha'}", "--adapter-dir", str(root),
                 "--api-key", "k", "--port", "0", "--dtype", "float32", "--device", "cpu", "--max-queue", "3",
                 "--max-tokens", "8"])
    assert code == 0
    assert seen["config"].host == "127.0.0.1"
    assert [(m["id"], m.get("loaded")) for m in seen["models"]["data"]] == [("tiny-llama", None), ("alpha", True),
                                                                         ("beta", False)]  # beta: on first use
    assert seen["unauth"] == 401


def test_bad_adapter_flag_is_a_cli_error(tiny_dirs, capsys):
    base, _, _ = tiny_dirs
    assert main(["serve", "--model", str(base), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--max-loras", "2"], "--max-loras must be at least 1, and needs --adapter-dir"),
    (["--max-loras", "1", "--adapter-dir", "ROOT", "--adapter", "alpha=ROOT/alpha"],
     "--max-loras 1: must be more than the 1 adapters loaded at startup"),
])
def test_bad_max_loras_is_a_cli_error(tiny_dirs, capsys, flags, says):
    base, root, _ = tiny_dirs
    flags = [f.replace("ROOT", str(root)) for f in flags]
    assert main(["serve", "--model", str(base), "--dtype", "float32", "--device", "cpu", *flags]) == 2
    assert says in capsys.readouterr().err


def test_missing_server_dependencies_say_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", "whatever"]) == 2
    assert "pip install 'lorakit[serve]'" in capsys.readouterr().err
