"""The dashboard's HTTP API and page: runs (list, detail, live metrics, stop, resume, delete), the new-run form
(schema, check with the memory plan, launch), the data view, the playground and exports.

Runs are named by their path under the runs root, passed as `?name=`; every name and path is checked by
paths.Roots before it is used. Errors are JSON: {"error": {"message", "problems", "fields"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import anyio
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..config import run_config_from_dict
from ..errors import ConfigError, LorakitError
from ..serve.sse import EventStreamResponse, sse
from ..train.metrics import METRICS_FILE
from ..train.output_dir import ADAPTER_DIR, RUN_FILE, clear_own_outputs, inspect_output_dir, read_run_file
from . import forms, runs
from .access import AccessGuard
from .jobs import CONFIG_FILE, TRAIN_LOG, Jobs, stop_run
from .paths import QUICKSTART_ASSETS, Roots, UnknownRun, check_run_name
from .playground import Dispatch, Playground, base_of

STATIC = Path(__file__).parent / "static"
EXPORT_FORMATS = {"hf": "", "gguf": ".gguf", "ollama": "", "lora-gguf": ".gguf"}
EXPORT_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
FOLLOW_SECONDS = 0.5  # how often a live curve looks for new rows (a stat of the file; rows are read by offset)


class Refused(Exception):
    def __init__(self, status: int, message: str, fields: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields or {}


def create_ui_app(roots: Roots, *, token: str | None = None, hosts: set[str] | None = None):
    """The dashboard as an ASGI app (FastAPI inside the access guard and the playground's dispatcher)."""
    jobs, playground = Jobs(roots.ui), Playground()
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        playground.close()  # the engine's thread; training and export processes go on by design

    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(Refused)
    async def refused(_: Request, err: Refused):
        return JSONResponse({"error": {"message": err.message, "fields": err.fields}}, status_code=err.status)

    @app.exception_handler(LorakitError)
    async def lorakit_error(_: Request, err: LorakitError):
        problems = getattr(err, "problems", [str(err)])
        return JSONResponse({"error": {"message": str(err), "problems": problems, "hint": err.hint,
                                       "fields": forms.by_field(problems)}}, status_code=400)

    @app.exception_handler(UnknownRun)
    async def missing(_: Request, err: UnknownRun):
        return JSONResponse({"error": {"message": f"no run named {err.args[0] if err.args else ''!r} under "
                                                  f"{roots.runs}"}}, status_code=404)

    def starting(name: str) -> tuple[int, float] | None:
        return jobs.running(name, TRAIN_LOG)

    def run_config_text(name: str) -> str | None:
        path = jobs.job_dir(name) / CONFIG_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    # ---- page and facts ----
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info():
        return {"version": __version__, "runs_root": str(roots.runs), "read_roots": [str(r) for r in roots.read],
                "quickstart": {"model.name_or_path": str(QUICKSTART_ASSETS / "model"),
                               "data.train": str(QUICKSTART_ASSETS / "data" / "train.jsonl"),
                               "data.validation": str(QUICKSTART_ASSETS / "data" / "val.jsonl")},
                "export_formats": list(EXPORT_FORMATS), "export_quants": list(EXPORT_QUANTS)}

    @app.get("/api/schema")
    async def schema():
        return {"fields": forms.form_schema()}

    # ---- runs ----
    @app.get("/api/runs")
    async def list_runs():
        return {"runs": [runs.summary(roots.runs, p, starting(p.relative_to(roots.runs).as_posix())).as_dict()
                         for p in runs.find_runs(roots.runs)] + _launching(roots, jobs)}

    @app.get("/api/run")
    async def run_detail(name: str):
        path = _run_or_launching(roots, name)
        summary = runs.summary(roots.runs, path, starting(name)).as_dict() if path else _launch_summary(jobs, name)
        record = (read_run_file(path) or {}) if path else {}
        return {**summary, "config": run_config_text(name), "settings": record.get("settings"),
                "checkpoints": runs.checkpoints(path) if path else [], "log": jobs.log_tail(name, TRAIN_LOG),
                "resumable": run_config_text(name) is not None}

    @app.get("/api/run/metrics")
    async def follow_metrics(name: str, request: Request):
        """Server-sent events: {"type": "rows"|"reset"|"status", ...} as metrics.jsonl grows."""
        path = _run_or_launching(roots, name) or roots.new_run_dir(name)
        follower = runs.MetricsFollower(path / METRICS_FILE)

        async def events():
            last_status = None
            while True:
                reset, rows = follower.read()
                if reset:
                    yield sse({"type": "reset"})
                if rows:
                    yield sse({"type": "rows", "rows": rows})
                status = (runs.status_of(path, starting(name))[0] if (path / RUN_FILE).is_file()
                          else "starting" if starting(name) else "failed")
                if status != last_status:
                    last_status = status
                    yield sse({"type": "status", "status": status})
                await asyncio.sleep(FOLLOW_SECONDS)

        return EventStreamResponse(events(), on_close=lambda: None)

    @app.get("/api/run/plan")
    async def run_plan(name: str):
        text = run_config_text(name)
        if text is None:
            raise Refused(409, f"run {name} was not started from this dashboard; plan it with: lorakit plan CONFIG")
        return await anyio.to_thread.run_sync(_plan, run_config_from_dict(yaml.safe_load(text)))

    @app.post("/api/run/stop")
    async def stop(name: str):
        pid = stop_run(_run_or_launching(roots, name) or roots.new_run_dir(name), starting(name))
        if pid is None:
            raise Refused(409, f"run {name} is not running")
        return {"stopping": pid, "message": "asked to stop: it saves a checkpoint first, then exits"}

    @app.post("/api/run/resume")
    async def resume(name: str):
        path = roots.run_dir(name)
        if runs.status_of(path, starting(name))[0] in ("running", "starting"):
            raise Refused(409, f"run {name} is already running")
        if run_config_text(name) is None:
            raise Refused(409, f"run {name} was not started from this dashboard, so its config file is unknown here; "
                               f"resume it with: lorakit train CONFIG --resume")
        pid = jobs.start(name, ["train", str(jobs.job_dir(name) / CONFIG_FILE), "--resume", "auto"], TRAIN_LOG,
                         cwd=roots.runs)
        return {"pid": pid}

    @app.delete("/api/run")
    async def delete(name: str, request: Request):
        body = await _json(request)
        if body.get("confirm") != name:
            raise Refused(400, f"deleting run {name} needs its name as confirmation: {{\"confirm\": \"{name}\"}}")
        path = _run_or_launching(roots, name)
        if starting(name) or (path and runs.status_of(path)[0] == "running"):
            raise Refused(409, f"run {name} is running; stop it first")
        removed = clear_own_outputs(inspect_output_dir(path)) if path else []
        kept = sorted(p.name for p in path.iterdir()) if path else []
        if path and not kept:
            path.rmdir()
        if jobs.job_dir(name).is_dir():
            shutil.rmtree(jobs.job_dir(name))
        return {"removed": removed, "kept": kept}

    # ---- new run ----
    @app.post("/api/check")
    async def check(request: Request):
        body = await _json(request)
        config, raw, problems = forms.check(roots, body.get("name", ""), body.get("values") or {},
                                            body.get("extra_yaml") or "")
        if problems:
            return {"ok": False, "fields": problems}
        try:
            plan = await anyio.to_thread.run_sync(_plan, config)
        except LorakitError as err:
            return {"ok": False, "fields": forms.by_field(getattr(err, "problems", [str(err)]))}
        return {"ok": True, "plan": plan, "yaml": _yaml(raw)}

    @app.post("/api/runs")
    async def launch(request: Request):
        body = await _json(request)
        name = body.get("name", "")
        config, raw, problems = forms.check(roots, name, body.get("values") or {}, body.get("extra_yaml") or "")
        if problems:
            raise Refused(400, "the run config has problems; they are shown beside their fields", problems)
        path = Path(raw["output_dir"])
        if path.exists() or starting(name):
            raise Refused(409, f"a run named {name} exists already; choose another name (or resume that run)",
                          {"run name": [f"run name: {name} exists already under {roots.runs}"]})
        config_file = jobs.job_dir(name) / CONFIG_FILE
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(_yaml(raw), encoding="utf-8")
        pid = jobs.start(name, ["train", str(config_file)], TRAIN_LOG, cwd=roots.runs)
        return {"name": name, "pid": pid}

    # ---- data ----
    @app.post("/api/data")
    async def data(request: Request):
        body = await _json(request)
        if body.get("run"):
            text = run_config_text(body["run"])
            if text is None:
                raise Refused(409, f"run {body['run']} was not started from this dashboard; its config is unknown")
            config = run_config_from_dict(yaml.safe_load(text))
        else:
            config, _, problems = forms.check(roots, body.get("name") or "preview", body.get("values") or {},
                                              body.get("extra_yaml") or "")
            if problems:
                raise Refused(400, "the run config has problems", problems)
        count = max(1, min(int(body.get("count") or 8), 64))
        return await anyio.to_thread.run_sync(_data_view, config, body.get("split") or "train", count)

    # ---- playground ----
    @app.get("/api/playground")
    async def playground_state():
        return {"loaded": playground.loaded}

    @app.post("/api/playground")
    async def playground_load(request: Request):
        names = (await _json(request)).get("runs") or []
        chosen = [(name, roots.run_dir(name)) for name in names]
        return {"loaded": await anyio.to_thread.run_sync(playground.load, chosen)}

    # ---- export ----
    @app.post("/api/run/export")
    async def export(name: str, request: Request):
        body = await _json(request)
        path, fmt, quant = roots.run_dir(name), body.get("format", "hf"), body.get("quant", "f16")
        if fmt not in EXPORT_FORMATS or quant not in EXPORT_QUANTS:
            raise Refused(400, f"format must be one of {', '.join(EXPORT_FORMATS)} and quant one of "
                               f"{', '.join(EXPORT_QUANTS)}")
        if not runs.has_adapter(path):
            raise Refused(409, f"run {name} has no adapter yet (it is written when training ends)")
        log_name = f"export-{fmt}.log"
        if jobs.running(name, log_name):
            raise Refused(409, f"an {fmt} export of {name} is already running")
        out = _export_path(roots, name, fmt)
        if out.exists() and body.get("overwrite") is not True:
            raise Refused(409, f"{out} exists; export again with overwrite (it replaces only what an earlier export "
                               "wrote there)")
        args = ["export", "--model", base_of(path)[0], "--adapter", str(path / ADAPTER_DIR), "--format", fmt,
                "--out", str(out)] + (["--quant", quant] if fmt in ("gguf", "ollama") else []) \
            + (["--overwrite"] if body.get("overwrite") is True else [])
        out.parent.mkdir(parents=True, exist_ok=True)
        return {"pid": jobs.start(name, args, log_name, cwd=roots.runs), "out": str(out)}

    @app.get("/api/run/exports")
    async def exports(name: str):
        roots.run_dir(name)
        found = []
        for fmt in EXPORT_FORMATS:
            record = jobs.record(name, f"export-{fmt}.log")
            if record is None:
                continue
            running = jobs.running(name, f"export-{fmt}.log") is not None
            out, code = _export_path(roots, name, fmt), jobs.exit_code(name, f"export-{fmt}.log")
            # The exit code when this dashboard saw the process end; after a restart, whether the output exists.
            state = "running" if running else "failed" if code not in (None, 0) or not out.exists() else "done"
            found.append({"format": fmt, "state": state, "out": str(out), "exit_code": code,
                          "log": jobs.log_tail(name, f"export-{fmt}.log", 4000)})
        return {"exports": found}

    @app.get("/api/run/check")
    async def deploy_check(name: str):
        path = roots.run_dir(name)
        if not runs.has_adapter(path):
            raise Refused(409, f"run {name} has no adapter yet")
        return await anyio.to_thread.run_sync(_deploy_check, path / ADAPTER_DIR)

    return AccessGuard(Dispatch(app, playground), token=token, hosts=hosts)


# ---- helpers ----
async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object")
    return body


def _run_or_launching(roots: Roots, name: str) -> Path | None:
    """The run's directory once its run file exists; None for a run the dashboard launched that has not written
    it yet (or never will: a launch that failed); UnknownRun for anything else."""
    try:
        return roots.run_dir(name)
    except UnknownRun:
        if "/" not in check_run_name(name) and (roots.ui / name / TRAIN_LOG).is_file():
            return None
        raise


def _launching(roots: Roots, jobs: Jobs) -> list[dict]:
    """Runs the dashboard launched whose run file does not exist (yet): starting, or failed before training."""
    if not roots.ui.is_dir():
        return []
    return [_launch_summary(jobs, d.name) for d in sorted(roots.ui.iterdir())
            if (d / TRAIN_LOG).is_file() and not (roots.runs / d.name / RUN_FILE).is_file()]


def _launch_summary(jobs: Jobs, name: str) -> dict:
    launch = jobs.running(name, TRAIN_LOG)
    return runs.RunSummary(name=name, status="starting" if launch else "failed", pid=launch[0] if launch else None,
                           detail=None if launch else "the run stopped before training began; its log says why",
                           step=None, total_steps=None, loss=None, eval_loss=None, started=None,
                           has_adapter=False).as_dict()


def _yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def _plan(config) -> dict:
    from ..plan.check import plan_report

    return plan_report(config)[0]


def _data_view(config, split: str, count: int) -> dict:
    """The examples of `split` as the model sees them: runs of text marked trained or not, per-example counts and
    warnings, and the records dropped or truncated (`lorakit data inspect`'s view, as JSON)."""
    from ..base_model import load_tokenizer
    from ..data import prepare
    from ..data.inspect import trained_runs, warnings_for
    from ..data.templates import resolve_template

    if config.objective != "sft":
        raise ConfigError(f"the data view shows sft data; for {config.objective} use `lorakit data inspect`",
                          where="data view")
    source = config.data.train if split == "train" else config.data.validation
    if source is None:
        raise ConfigError(f"data.{split}: not set in this config", where="data view")
    tokenizer = load_tokenizer(config.model)
    prepared = prepare(source, tokenizer, config.data)
    stop_ids = {tokenizer.eos_token_id} - {None}
    if prepared.summary.format != "text":
        stop_ids |= resolve_template(tokenizer, config.data.template).end_of_turn_ids
    examples = []
    for example in prepared.examples[:count]:
        pieces = [{"text": tokenizer.decode(ids, skip_special_tokens=False), "trained": trained}
                  for trained, ids in trained_runs(example)]
        examples.append({"source": example.source, "tokens": len(example.input_ids),
                         "trained_tokens": sum(len(p) for t, p in trained_runs(example) if t),
                         "pieces": pieces, "warnings": warnings_for(example, stop_ids, tokenizer)})
    s = prepared.summary
    return {"summary": s.line(), "records_read": s.records_read, "kept": s.kept, "truncated": s.truncated,
            "dropped": dict(s.dropped), "problems": list(s.problems), "examples": examples,
            "total_examples": len(prepared.examples)}


def _export_path(roots: Roots, name: str, fmt: str) -> Path:
    return roots.runs / "exports" / f"{name.replace('/', '-')}-{fmt}{EXPORT_FORMATS[fmt]}"


def _deploy_check(adapter: Path) -> dict:
    """`lorakit check ADAPTER --json`'s object."""
    from ..adapter_check import check_adapter

    return check_adapter(adapter).as_dict()
