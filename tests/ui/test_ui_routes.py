"""The dashboard's HTTP API (lorakit ui), in-process with httpx: the form and its checks, the path and access rules,
run status read from the run's own files, the live metrics, delete, the data view, the playground and exports.
Processes the dashboard starts (training, export) are tested in test_ui_jobs.py and the browser flow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.config import load_run_config
from lorakit.errors import ConfigError
from lorakit.train.lock import acquire_lock, release_lock
from lorakit.train.output_dir import RUN_FILE, TRAINER_STATE, record_outcome, write_run_file
from lorakit.ui.paths import Roots
from lorakit.ui.runs import MetricsFollower
from ui_helpers import FORM, QUICKSTART, client, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A runs root holding one finished run ("done") of the quickstart model."""
    root = tmp_path_factory.mktemp("ui") / "runs"
    root.mkdir()
    train_run(root, "done")
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


# ---- the form ----
def test_the_form_lists_each_field_with_its_kind_default_choices_and_help(root):
    fields = {f["name"]: f for f in client(root).get("/api/schema").json()["fields"]}
    assert fields["train.lr"]["kind"] == "float" and fields["train.lr"]["default"] == 2e-4
    assert fields["train.lr_schedule"]["kind"] == "choice"
    assert fields["train.lr_schedule"]["choices"] == ["constant", "linear", "cosine"]
    assert fields["model.name_or_path"]["required"] and "hub id" in fields["model.name_or_path"]["help"]
    assert fields["lora.target_modules"]["kind"] == "yaml"  # a str or a list: typed as YAML
    assert fields["train.max_steps"]["nullable"] and fields["data.packing"]["kind"] == "bool"
    assert not any(name.startswith("model.quantization") for name in fields)  # nested sections: the YAML box


def test_a_bad_value_is_reported_beside_its_field_with_the_clis_message(root):
    values = {**FORM, "train.lr": -1.0, "lora.r": 0, "train.lr_schedule": "sideways"}
    reply = client(root).post("/api/check", json={"name": "r1", "values": values}).json()
    assert not reply["ok"]
    assert set(reply["fields"]) == {"train.lr", "lora.r", "train.lr_schedule"}
    yaml_file = root.parent / "bad.yaml"
    yaml_file.write_text(json.dumps({"model": {"name_or_path": QUICKSTART["model.name_or_path"]},
                                     "train": {"lr": -1.0}}))
    with pytest.raises(ConfigError) as cli:
        load_run_config(yaml_file)
    assert reply["fields"]["train.lr"] == [p for p in cli.value.problems if p.startswith("train.lr")]


def test_a_good_form_gets_the_memory_plan_and_the_config_it_would_run(root):
    reply = client(root).post("/api/check", json={"name": "r1", "values": FORM}).json()
    assert reply["ok"], reply
    assert reply["plan"]["peak_bytes"] > 0 and reply["plan"]["items"]
    assert f"output_dir: {root / 'r1'}" in reply["yaml"] and "lr: 0.003" in reply["yaml"]


def test_the_extra_yaml_box_sets_other_sections_and_its_errors_are_shown(root):
    c = client(root)
    ok = c.post("/api/check", json={"name": "r1", "values": FORM, "extra_yaml": "eval:\n  on_forgetting: warn\n"}).json()
    assert ok["ok"] and "on_forgetting: warn" in ok["yaml"]
    bad = c.post("/api/check", json={"name": "r1", "values": FORM, "extra_yaml": "eval: [1, 2"}).json()
    assert not bad["ok"] and "more settings (YAML)" in bad["fields"][""][0]


# ---- what paths a request may name ----
@pytest.mark.parametrize("field, value", [("model.name_or_path", "/etc"), ("data.train", "../../../etc/passwd"),
                                          ("data.train", "/proc/self/environ")])
def test_models_and_data_outside_the_allowed_roots_are_refused(root, field, value):
    reply = client(root).post("/api/check", json={"name": "r1", "values": {**FORM, field: value}}).json()
    assert not reply["ok"] and field in reply["fields"]
    assert "outside the directories" in reply["fields"][field][0] or "does not exist" in reply["fields"][field][0]


@pytest.mark.parametrize("extra", ["eval:\n  general_text: /etc/passwd\n",
                                   "tasks:\n  - {name: a, train: /etc/passwd}\n  - {name: b, train: /etc/hosts}\n"])
def test_paths_in_the_yaml_box_follow_the_same_rule(root, extra):
    values = {k: v for k, v in FORM.items() if k not in ("data.train", "data.validation") or "tasks" not in extra}
    reply = client(root).post("/api/check", json={"name": "r1", "values": values, "extra_yaml": extra}).json()
    assert not reply["ok"] and any("outside the directories" in p for p in reply["fields"][""]), reply


def test_a_gguf_file_must_be_a_name_inside_the_model_directory(root):
    values = {**FORM, "model.gguf_file": "../../../etc/model.gguf"}
    reply = client(root).post("/api/check", json={"name": "r1", "values": values}).json()
    assert "model.gguf_file" in reply["fields"]


def test_a_hub_id_is_a_model_name_not_a_path(root):
    roots = Roots(root)
    assert roots.readable("HuggingFaceTB/SmolLM2-135M", "model.name_or_path") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ConfigError, match="does not exist"):
        roots.readable("org/../../etc", "model.name_or_path")


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../b", "..", ".lorakit-ui", "x/y/z", "%2e%2e"])
def test_run_names_cannot_leave_the_runs_root(root, name):
    c = client(root)
    assert c.get("/api/run", params={"name": name}).status_code == 404
    assert c.get("/api/run/plan", params={"name": name}).status_code == 404
    assert c.post("/api/data", json={"run": name}).status_code == 404
    assert c.post("/api/run/resume", params={"name": name}, json={}).status_code == 404
    assert c.post("/api/run/stop", params={"name": name}, json={}).status_code in (400, 404)
    assert c.request("DELETE", "/api/run", params={"name": name}, json={"confirm": name}).status_code in (400, 404)
    launched = c.post("/api/runs", json={"name": name, "values": FORM})
    assert launched.status_code == 400 and "run name" in launched.json()["error"]["fields"]


def test_a_symlink_out_of_the_root_is_not_a_run(root, tmp_path):
    outside = tmp_path / "elsewhere"
    write_run_file(outside, {})
    (root / "link").symlink_to(outside)
    c = client(root)
    assert c.get("/api/runs").json()["runs"] == []
    assert c.get("/api/run", params={"name": "link"}).status_code == 404


# ---- who may use it ----
def test_a_token_is_required_everywhere_but_the_page_itself(root):
    c = client(root, token="s3cret")
    assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/runs", params={"token": "s3cret"}).status_code == 200  # EventSource cannot send headers
    assert c.post("/playground/v1/chat/completions", json={}).status_code == 401


def test_a_loopback_dashboard_answers_only_its_own_host_name(root):
    c = client(root, hosts={"127.0.0.1:7860", "localhost:7860"})
    assert c.get("/api/runs", headers={"Host": "127.0.0.1:7860"}).status_code == 200
    assert c.get("/api/runs", headers={"Host": "attacker.example:7860"}).status_code == 403  # DNS rebinding


def test_changes_must_be_json_so_a_cross_site_form_cannot_send_them(root):
    c = client(root)
    reply = c.post("/api/runs", content="name=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 415


# ---- status from the run's own files ----
def test_status_is_read_from_the_lock_and_the_run_file(root):
    for name in ("live", "done", "stopped", "broken", "killed", "old"):
        write_run_file(root / name, {"train.max_steps": 10})
    acquire_lock(root / "live")
    record_outcome(root / "done", "finished")
    record_outcome(root / "stopped", "interrupted")
    record_outcome(root / "broken", "failed", "DataError: bad record")
    (root / "old" / RUN_FILE).write_text(json.dumps({"settings": {}}))
    (root / "old" / TRAINER_STATE).write_text("{}")  # an older lorakit's finished run: no "ended" record
    try:
        runs = {r["name"]: r for r in client(root).get("/api/runs").json()["runs"]}
    finally:
        release_lock(root / "live")
    assert {n: r["status"] for n, r in runs.items()} == {"live": "running", "done": "finished", "stopped": "interrupted",
                                                        "broken": "failed", "killed": "killed", "old": "finished"}
    assert runs["live"]["pid"] == os.getpid() and runs["broken"]["detail"] == "DataError: bad record"
    assert runs["done"]["total_steps"] == 10


def test_a_finished_run_shows_its_progress_checkpoints_and_settings(trained):
    c = client(trained)
    run = c.get("/api/run", params={"name": "done"}).json()
    assert run["status"] == "finished" and run["step"] == run["total_steps"] == 30 and run["has_adapter"]
    assert [k["name"] for k in run["checkpoints"]] == ["step-00000015", "step-00000030"]
    assert run["settings"]["lora.r"] == 8 and run["eval_loss"] is not None
    assert not run["resumable"]  # started outside the dashboard: its config file is unknown here
    assert c.post("/api/run/resume", params={"name": "done"}, json={}).status_code == 409


# ---- live metrics ----
def test_the_metrics_follower_reads_only_new_complete_rows_and_notices_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read() == (False, [])
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert follower.read() == (False, [{"step": 1, "loss": 2.0}])
    with open(path, "a") as handle:
        handle.write('ss": 1.5}\n')
    assert follower.read() == (False, [{"step": 2, "loss": 1.5}])
    assert follower.read() == (False, [])
    replacement = tmp_path / "new.jsonl"  # a resumed run rewrites the file atomically (a new inode)
    replacement.write_text('{"step": 1, "loss": 2.0}\n')
    os.replace(replacement, path)
    assert follower.read() == (True, [{"step": 1, "loss": 2.0}])
    path.write_text("")  # a run started over truncates it
    assert follower.read() == (True, [])


def test_the_metrics_stream_sends_the_rows_and_the_status(trained):
    with client(trained).stream("GET", "/api/run/metrics", params={"name": "done"}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if {e["type"] for e in events} >= {"rows", "status"}:
                break
    rows = next(e["rows"] for e in events if e["type"] == "rows")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert next(e["status"] for e in events if e["type"] == "status") == "finished"


# ---- delete ----
def test_delete_needs_the_run_name_as_confirmation_and_keeps_what_lorakit_did_not_write(root):
    write_run_file(root / "gone", {})
    (root / "gone" / "metrics.jsonl").write_text("")
    (root / "gone" / "notes.txt").write_text("mine")
    c = client(root)
    assert c.request("DELETE", "/api/run", params={"name": "gone"}, json={}).status_code == 400
    reply = c.request("DELETE", "/api/run", params={"name": "gone"}, json={"confirm": "gone"}).json()
    assert sorted(reply["removed"]) == ["lorakit_run.json", "metrics.jsonl"] and reply["kept"] == ["notes.txt"]
    assert (root / "gone" / "notes.txt").read_text() == "mine"


def test_a_running_run_is_not_deleted(root):
    write_run_file(root / "live", {})
    acquire_lock(root / "live")
    try:
        reply = client(root).request("DELETE", "/api/run", params={"name": "live"}, json={"confirm": "live"})
    finally:
        release_lock(root / "live")
    assert reply.status_code == 409 and (root / "live" / RUN_FILE).is_file()


# ---- data view ----
def test_the_data_view_marks_trained_tokens_and_lists_dropped_records(root):
    data = root / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"nonsense": 1}) + "\n" + json.dumps(good) + "\n")
    values = {**FORM, "data.train": str(data), "data.validation": None, "data.skip_bad_records": True,
              "data.max_drop_fraction": 0.5}
    values = {k: v for k, v in values.items() if v is not None}
    view = client(root).post("/api/data", json={"name": "preview", "values": values, "count": 4}).json()
    assert view["records_read"] == 3 and view["kept"] == 2 and sum(view["dropped"].values()) == 1
    assert any(":2" in p for p in view["problems"]), view["problems"]
    example = view["examples"][0]
    trained = "".join(p["text"] for p in example["pieces"] if p["trained"])
    assert "hello there" in trained and "hi" not in trained.replace("hello there", "")
    assert example["trained_tokens"] < example["tokens"]


# ---- playground ----
def test_the_playground_serves_the_base_and_the_adapter_through_the_serve_engine(trained):
    with client(trained) as c:
        assert c.post("/playground/v1/chat/completions", json={}).status_code == 404  # nothing loaded yet
        loaded = c.post("/api/playground", json={"runs": ["done"]}).json()["loaded"]
        assert [col["label"] for col in loaded["columns"]] == ["base (model)", "done"]
        answers = {}
        for column in loaded["columns"]:
            reply = c.post("/playground/v1/chat/completions", json={
                "model": column["model"], "messages": [{"role": "user", "content": "Reverse: abc"}],
                "max_tokens": 12, "temperature": 0})
            assert reply.status_code == 200, reply.text
            answers[column["label"]] = reply.json()["choices"][0]["message"]["content"]
        assert answers["base (model)"] != answers["done"]  # the adapter changes the answer
        assert c.get("/api/playground").json()["loaded"]["base"] == QUICKSTART["model.name_or_path"]


def test_the_playground_refuses_a_run_without_an_adapter(root):
    write_run_file(root / "fresh", {"model.name_or_path": QUICKSTART["model.name_or_path"]})
    reply = client(root).post("/api/playground", json={"runs": ["fresh"]})
    assert reply.status_code == 400 and "no adapter yet" in reply.json()["error"]["message"]


# ---- export ----
def test_export_refuses_unknown_formats_runs_without_adapters_and_existing_outputs(trained, root):
    c = client(trained)
    assert c.post("/api/run/export", params={"name": "done"}, json={"format": "exe"}).status_code == 400
    (trained / "exports").mkdir(exist_ok=True)
    (trained / "exports" / "done-hf").mkdir(exist_ok=True)
    try:
        reply = c.post("/api/run/export", params={"name": "done"}, json={"format": "hf"})
        assert reply.status_code == 409 and "exists" in reply.json()["error"]["message"]
    finally:
        (trained / "exports" / "done-hf").rmdir()
    write_run_file(root / "fresh", {})
    assert client(root).post("/api/run/export", params={"name": "fresh"}, json={"format": "hf"}).status_code == 409


def test_the_deploy_check_reports_each_destination(trained):
    report = client(trained).get("/api/run/check", params={"name": "done"}).json()
    assert set(report["targets"]) == {"vllm", "llama.cpp", "ollama", "peft"}
    assert report["targets"]["vllm"] == "ok"

