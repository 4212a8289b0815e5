"""Adapters loaded and unloaded at runtime over HTTP, only from inside --adapter-dir and only as safetensors:
names or paths that leave the directory ("..", absolute, symlinks out) and pickle-only adapters are refused."""

from __future__ import annotations

import os

import httpx
import pytest
from serve_helpers import PROMPTS, greedy, make_bin_only, run_server, served, tiny_dirs  # noqa: F401

from lorakit.serve.adapters import resolve_adapter
from lorakit.serve.errors import APIError


def _post(served, body):
    return httpx.post(served.url + "/v1/adapters", json=body, timeout=60)


def test_hot_load_use_and_unload(served):
    r = _post(served, {"name": "beta"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "beta"
    try:
        assert "beta" in [m.id for m in served.client().models.list().data]
        text, _, _ = greedy(served.engine, served.tokenizer, PROMPTS[0], "beta", 10)
        out = served.client().completions.create(model="beta", prompt=PROMPTS[0], max_tokens=10)
        assert out.choices[0].text == text
        assert _post(served, {"name": "beta"}).status_code == 409  # already served
    finally:
        assert httpx.delete(served.url + "/v1/adapters/beta").status_code == 200
    # unloaded, it is listed as servable, not loaded, and the next request naming it loads it again
    assert [m.loaded for m in served.client().models.list().data if m.id == "beta"] == [False]
    again = httpx.post(served.url + "/v1/completions", json={"model": "beta", "prompt": "hi"})
    assert again.status_code == 200 and "beta" in served.engine.adapters()
    assert httpx.delete(served.url + "/v1/adapters/beta").status_code == 200
    gone = httpx.post(served.url + "/v1/completions", json={"model": "gamma", "prompt": "hi"})  # not in the dir
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_load_under_another_name_with_relative_path(served):
    r = _post(served, {"name": "beta2", "path": "beta"})
    assert r.status_code == 200, r.text
    assert httpx.delete(served.url + "/v1/adapters/beta2").status_code == 200
    assert httpx.delete(served.url + "/v1/adapters/beta2").status_code == 404


TRAVERSALS = {
    "dotdot": {"name": "x", "path": "../outside/evil"},
    "dotdot_inside": {"name": "x", "path": "alpha/../../outside/evil"},
    "absolute": {"name": "x", "path": "/etc"},
    "windows_drive": {"name": "x", "path": "C:\\x"},
    "backslash": {"name": "x", "path": "..\\outside"},
    "nul": {"name": "x", "path": "alpha\x00"},
    "home": {"name": "x", "path": "~/x"},
    "fullwidth_dots": {"name": "x", "path": "\uff0e\uff0e/outside"},
    "name_dotdot": {"name": ".."},
    "name_slash": {"name": "a/b"},
    "name_long": {"name": "a" * 65},
    "root_itself": {"name": "x", "path": "."},
}


@pytest.mark.parametrize("body", TRAVERSALS.values(), ids=TRAVERSALS.keys())
def test_paths_leaving_the_adapter_dir_are_refused(served, body):
    r = _post(served, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("name", "path")
    assert str(served.root) not in r.text  # no server paths in messages


def test_symlink_out_of_the_adapter_dir_is_refused(served, tiny_dirs):
    _, root, outside = tiny_dirs
    link = root / "sneaky"
    if not link.exists():
        os.symlink(outside / "evil", link)
    r = _post(served, {"name": "sneaky"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "path_outside_adapter_dir"
    assert "sneaky" not in served.engine.adapters()


def test_symlinked_weights_file_out_of_the_dir_is_refused(tiny_dirs):
    _, root, outside = tiny_dirs
    target = root / "halflink"
    target.mkdir(exist_ok=True)
    (target / "adapter_config.json").write_text((outside / "evil" / "adapter_config.json").read_text())
    if not (target / "adapter_model.safetensors").exists():
        os.symlink(outside / "evil" / "adapter_model.safetensors", target / "adapter_model.safetensors")
    with pytest.raises(APIError) as err:
        resolve_adapter(root, "halflink", None)
    assert err.value.status == 400 and err.value.code == "path_outside_adapter_dir"


def test_bin_only_adapter_is_refused_with_a_reason(served):
    if not (served.root / "pickled").exists():
        make_bin_only(served.root, "alpha", "pickled")
    r = _post(served, {"name": "pickled"})
    assert r.status_code == 400
    assert "safetensors" in r.json()["error"]["message"] and "adapter_model.bin" in r.json()["error"]["message"]


def test_missing_adapter_dir_entry_is_404(served):
    r = _post(served, {"name": "nosuch"})
    assert r.status_code == 404
    assert str(served.root) not in r.text


def test_runtime_loading_is_off_without_adapter_dir(served):
    from lorakit.serve import ServeLimits, create_app

    app = create_app(served.engine, served.tokenizer, base_name="tiny-llama", adapter_dir=None, limits=ServeLimits())
    with run_server(app) as url:
        r = httpx.post(url + "/v1/adapters", json={"name": "beta"})
        assert r.status_code == 403
        assert "--adapter-dir" in r.json()["error"]["message"]
        assert httpx.delete(url + "/v1/adapters/alpha").status_code == 403
