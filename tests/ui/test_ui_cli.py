"""`lorakit ui` as a person starts it (a child process), and a run it launches that fails: what they see."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

from ui_helpers import FORM, client, free_port, wait_until


def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:
        return 0  # not listening yet


def test_on_a_reachable_address_the_dashboard_makes_a_token_and_prints_the_address_with_it(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "ui", "--root", str(tmp_path), "--host", "0.0.0.0",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("lorakit ui: runs under ")
        address = lines[1].removeprefix("open ").strip()
        assert address.startswith(f"http://0.0.0.0:{port}/?token=")
        token = address.split("token=")[1]
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/") == 200, 30, "the dashboard to answer")
        assert _get(f"http://127.0.0.1:{port}/api/runs") == 401
        assert _get(f"http://127.0.0.1:{port}/api/runs", token) == 200
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_a_run_that_fails_in_its_process_is_listed_as_failed_with_its_error(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    data = root / "train.jsonl"
    data.write_text('{"nonsense": 1}\n' * 4)  # a file that exists but holds no valid record: found by the run
    c = client(root)
    launched = c.post("/api/runs", json={"name": "bad", "values": {**FORM, "data.train": str(data)}})
    assert launched.status_code == 200, launched.text

    def listed() -> dict:
        return next(r for r in c.get("/api/runs").json()["runs"] if r["name"] == "bad")

    wait_until(lambda: listed()["status"] == "failed", 120, "the run to fail")
    run = c.get("/api/run", params={"name": "bad"}).json()
    assert "error:" in run["log"] and "nonsense" in run["log"]
    assert json.dumps(listed())  # and the list still answers
