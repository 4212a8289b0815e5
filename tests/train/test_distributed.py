"""`torchrun -m lorakit train` on 2 CPU processes (gloo): the same losses, evaluation and adapter as one process
with twice the gradient accumulation; a 2-process checkpoint resumes on 1 process; a rank that fails stops
the run. The runs are real torchrun launches of the CLI, kept to a few steps of a tiny model."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from data_helpers import save_chat_llama
from lorakit.config import DistributedConfig
from lorakit.errors import ConfigError
from lorakit.train.distributed import init_distributed, init_runtime
from lorakit.train.runtime import OneProcess, Torchrun

STEPS = 12  # 21 batches of 2 per epoch: step 11 is a short window (one micro-batch for two processes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama with a chat tokenizer, train/val chat data."""
    root = tmp_path_factory.mktemp("ddp")
    save_chat_llama(root / "model")
    for name, n, seed in (("train", 42, 0), ("val", 10, 1)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                a, b = (seed * 7 + i * 3) % 10, (i * 5 + 1) % 10
                question = f"What is {a} plus {b}?" + " Please answer." * (i % 3)  # uneven lengths
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": f"It is {a + b}."}]}) + "\n")
    return root


def _config(root, name: str) -> str:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
        data: {{train: {root / "train.jsonl"}, validation: {root / "val.jsonl"}, max_seq_len: 64}}
        train: {{max_steps: {STEPS}, batch_size: 2, grad_accum: 1, lr: 5.0e-3, lr_schedule: constant, seed: 0,
                eval_every: 6, save_every: 6}}
        output_dir: {root / name}
        """))
    return str(path)


def _env() -> dict:
    # One thread per process in every run: two processes share the 2 cores, and the summation order inside
    # ops cannot differ between the 1- and 2-process runs.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _single(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _metrics(out) -> tuple[dict[int, float], dict[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses) == len(dict(losses))  # one writer: each step logged once
    return dict(losses), {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


@pytest.fixture(scope="module")
def reference(workdir):
    """One process, grad_accum 2: the run two processes with grad_accum 1 must reproduce."""
    _ok(_single(["train", _config(workdir, "single"), "--set", "train.grad_accum=2"]))
    return workdir / "single"


def test_two_processes_train_like_one_with_double_accumulation(workdir, reference):
    output = _ok(_torchrun(2, ["-m", "lorakit", "train", _config(workdir, "ddp")]))
    assert "2 processes (gloo)" in output and "global batch of 4" in output
    out = workdir / "ddp"
    losses, evals = _metrics(out)
    ref_losses, ref_evals = _metrics(reference)
    assert sorted(losses) == list(range(1, STEPS + 1)) and sorted(evals) == [6, 12]
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    for step in ref_evals:  # evaluation is shared out and summed, not rank 0's half
        assert evals[step] == pytest.approx(ref_evals[step], rel=1e-5), step
    adapter, ref_adapter = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, reference))
    assert adapter.keys() == ref_adapter.keys()
    for name in adapter:
        torch.testing.assert_close(adapter[name], ref_adapter[name], rtol=1e-4, atol=1e-6)
    assert not any(torch.equal(adapter[n], torch.zeros_like(adapter[n])) for n in adapter if "lora_B" in n)


def test_fsdp_shards_the_base_and_trains_like_one_process(workdir, reference):
    output = _ok(_torchrun(2, ["-m", "lorakit", "train", _config(workdir, "fsdp"), "--set", "distributed.strategy=fsdp"]))
    assert "loaded straight into shards: this process holds 1/2 of each decoder layer" in output
    assert "the frozen weights of 2 decoder layers are sharded over 2 processes" in output
    out = workdir / "fsdp"
    losses, evals = _metrics(out)
    ref_losses, ref_evals = _metrics(reference)
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    for step in ref_evals:
        assert evals[step] == pytest.approx(ref_evals[step], rel=1e-5), step
    adapter, ref_adapter = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, reference))
    for name in ref_adapter:  # the saved adapter is whole (not a shard) and equal
        torch.testing.assert_close(adapter[name], ref_adapter[name], rtol=1e-4, atol=1e-6)


def _tasks_config(root, name: str) -> str:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
        data: {{max_seq_len: 64}}
        tasks:
          - {{name: sums, train: {root / "train.jsonl"}}}
          - {{name: small, train: {root / "val.jsonl"}, validation: {root / "val.jsonl"}, lora: {{r: 2, target_modules: [v_proj]}}}}
        train: {{max_steps: 11, batch_size: 2, grad_accum: 1, lr: 5.0e-3, lr_schedule: constant, seed: 0}}
        output_dir: {root / name}
        """))
    return str(path)


@pytest.fixture(scope="module")
def tasks_reference(workdir):
    _ok(_single(["train", _tasks_config(workdir, "tasks_single"), "--set", "train.grad_accum=2"]))
    return workdir / "tasks_single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_several_tasks_train_on_two_processes_like_on_one(workdir, tasks_reference, strategy):
    """tasks: under torchrun: each process takes its share of the joint micro-batches; per-task losses, the
    evaluation and every adapter equal one process with twice the accumulation. 21 joint micro-batches per
    epoch: step 11 of 11 is a short window, which fsdp pads with a zero-weight forward."""
    out = workdir / f"tasks_{strategy}"
    _ok(_torchrun(2, ["-m", "lorakit", "train", _tasks_config(workdir, out.name), "--set",
                      f"distributed.strategy={strategy}"]))
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (tasks_reference, out)}
    task_losses = {run: [r["task_loss"] for r in rs if "task_loss" in r] for run, rs in rows.items()}
    assert len(task_losses[out]) == 11
    for two, one in zip(task_losses[out], task_losses[tasks_reference]):
        assert two == pytest.approx(one, rel=1e-5)
    evals = {run: [r["eval_loss"] for r in rs if "eval_loss" in r] for run, rs in rows.items()}
    assert evals[out] == pytest.approx(evals[tasks_reference], rel=1e-5)
    for task in ("sums", "small"):
        two, one = (load_file(run / "adapter" / task / "adapter_model.safetensors") for run in (out, tasks_reference))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_loading_into_shards_keeps_half_of_each_layer_and_the_rest_whole(workdir, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""\
        import json, torch
        from torch.distributed.tensor import DTensor
        from lorakit.base_model import load_base_model
        from lorakit.config import DistributedConfig, ModelConfig
        from lorakit.train.distributed import init_distributed
        run = init_distributed(DistributedConfig(strategy="fsdp"))
        model = load_base_model(ModelConfig(name_or_path={str(workdir / "model")!r}, dtype="float32"),
                                shard_over=run).model
        report = {{"local": 0, "full": 0, "plain": 0}}
        for name, p in model.named_parameters():
            if isinstance(p, DTensor):
                report["local"] += p.to_local().numel()
                report["full"] += p.numel()
            else:
                report["plain"] += p.numel()
        reference = __import__("transformers").AutoModelForCausalLM.from_pretrained({str(workdir / "model")!r})
        ref = dict(reference.named_parameters())
        gathered = {{n: (p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()}}
        report["equal"] = all(torch.equal(gathered[n], ref[n]) for n in ref)
        with open(f"{tmp_path}/report-{{run.rank}}.json", "w") as f:  # not stdout: the ranks' prints interleave
            json.dump(report, f)
        run.close()
        """))
    _ok(_torchrun(2, [str(script)], timeout=180))
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["equal"]  # gathered back, every weight is the checkpoint's
        assert report["full"] > 0 and report["plain"] > 0  # layers sharded; embeddings, norm and head whole
        assert report["local"] * 2 == report["full"]  # each process holds half of every layer


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_one_process(workdir, reference, strategy):
    config = _config(workdir, f"resumed-{strategy}")
    _ok(_torchrun(2, ["-m", "lorakit", "train", config, "--set", "train.max_steps=6",
                      "--set", f"distributed.strategy={strategy}"]))
    out = workdir / f"resumed-{strategy}"
    assert (out / "checkpoints" / "step-00000006").is_dir()
    # Same micro-batches per step (1 process x grad_accum 2): picks up at step 7 exactly.
    output = _ok(_single(["train", config, "--set", "train.grad_accum=2", "--set", "train.resume=auto"]))
    assert "resumed from" in output
    losses, _ = _metrics(out)
    ref_losses, _ = _metrics(reference)
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    # A different number of micro-batches per step would change the run: refused, saying what differs.
    done = _single(["train", config, "--set", "train.resume=auto", "--set", "train.max_steps=14"])
    assert done.returncode != 0 and "train.grad_accum_x_processes: checkpoint 2, now 1" in done.stdout + done.stderr


def test_a_failing_rank_stops_every_rank_with_its_error_shown(workdir, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        import lorakit.train.objectives.sft as sft
        if os.environ["RANK"] == "1":
            real, calls = sft.lm_loss_sum, []
            def failing(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("injected failure on rank 1")
                return real(*args, **kwargs)
            sft.lm_loss_sum = failing
        from lorakit.cli import main
        sys.exit(main(sys.argv[1:]))
        """))
    done = _torchrun(2, [str(script), "train", _config(workdir, "failing")], timeout=180)  # a hang fails here
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stdout + done.stderr


# ---- in-process pieces --------------------------------------------------------------------------------
def test_each_process_takes_every_world_th_micro_batch():
    window = list("abcde")
    shares = [Torchrun(rank=r, world=2, local_rank=r, backend="gloo").share(window) for r in range(2)]
    assert shares == [["a", "c", "e"], ["b", "d"]]
    assert Torchrun(rank=2, world=3, local_rank=2, backend="gloo").share(["a"]) == []


def test_fsdp_pads_short_shares_to_the_busiest_process_and_ddp_does_not():
    runs = [Torchrun(rank=r, world=2, local_rank=r, backend="gloo", strategy="fsdp") for r in range(2)]
    assert [run.padding(list("abcde")) for run in runs] == [0, 1]
    assert [run.padding(["a"]) for run in runs] == [0, 1]
    assert Torchrun(rank=1, world=2, local_rank=1, backend="gloo").padding(["a"]) == 0  # ddp


def test_split_gives_each_process_its_share_and_the_fillers_that_keep_fsdp_in_step(monkeypatch):
    """What the loop asks of a runtime: (this process's micro-batches, repeats to run with zero weight)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fsdp = [Torchrun(rank=r, world=2, local_rank=r, backend="gloo", strategy="fsdp") for r in range(2)]
    assert [run.split(iter("abc")) for run in fsdp] == [(["a", "c"], []), (["b"], ["a"])]
    assert Torchrun(rank=1, world=2, local_rank=1, backend="gloo").split("abc") == (["b"], [])  # ddp: no fillers
    items = iter("abc")
    mine, fillers = OneProcess().split(items)
    assert mine is items and fillers == []  # one process: everything, untouched (evaluation stays lazy)
    assert OneProcess().sum([1.5, 2]) == [1.5, 2] and init_runtime(DistributedConfig()).world == 1


def test_a_single_process_ignores_the_distributed_section(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(DistributedConfig(strategy="fsdp")) is None


def test_bad_launches_are_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="start the run with torchrun"):
        init_distributed(DistributedConfig())
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="not a number"):
        init_distributed(DistributedConfig())


def _preference_config(root, name: str, objective: str) -> str:
    """Pairs (dpo) or labelled completions (kto) built from the chat data's questions, right and wrong sums."""
    records = []
    for line in (root / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt, right = messages[0]["content"], messages[1]["content"]
        wrong = right.replace("It is ", "It is not ")
        records += ([{"prompt": prompt, "chosen": right, "rejected": wrong}] if objective == "dpo" else
                    [{"prompt": prompt, "completion": right, "label": True},
                     {"prompt": prompt, "completion": wrong, "label": False}])
    (root / f"{objective}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        objective: {objective}
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
        data: {{train: {root / f"{objective}.jsonl"}, validation_fraction: 0.2, max_seq_len: 64}}
        train: {{max_steps: 6, batch_size: 2, grad_accum: 1, lr: 5.0e-3, lr_schedule: constant, seed: 0,
                eval_every: 3}}
        output_dir: {root / name}
        """))
    return str(path)


@pytest.mark.parametrize("objective, strategy", [("dpo", "ddp"), ("dpo", "fsdp"), ("kto", "ddp")])
def test_preference_objectives_train_on_two_processes_like_on_one(workdir, objective, strategy):
    """dpo and kto under torchrun: losses, reward metrics, evaluation and the adapter equal one process with twice
    the accumulation (KTO's KL estimate is per micro-batch, so it does not depend on the process layout)."""
    single = workdir / f"{objective}_single"
    if not single.exists():
        _ok(_single(["train", _preference_config(workdir, single.name, objective), "--set", "train.grad_accum=2"]))
    out = workdir / f"{objective}_{strategy}"
    _ok(_torchrun(2, ["-m", "lorakit", "train", _preference_config(workdir, out.name, objective), "--set",
                      f"distributed.strategy={strategy}"]))
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (single, out)}
    for key in ("loss", "rewards/chosen", "eval_loss"):
        # None: a KTO window without a desirable example has no chosen reward
        two, one = ([math.nan if r[key] is None else r[key] for r in rows[run] if key in r] for run in (out, single))
        assert len(two) == len(one) > 0 and two == pytest.approx(one, rel=1e-5, abs=1e-7, nan_ok=True), key
    two, one = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (out, single))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def _grpo_config(root, name: str) -> str:
    """The chat data's questions as prompts, rewarded for being short and for holding a digit."""
    prompts = [{"prompt": json.loads(line)["messages"][0]["content"]}
               for line in (root / "train.jsonl").read_text().splitlines()[:20]]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{name_or_path: {root / "model"}, dtype: float32}}
        objective: grpo
        lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}}
        data: {{train: {root / "prompts.jsonl"}, validation_fraction: 0.2, max_seq_len: 64}}
        train: {{max_steps: 4, batch_size: 2, grad_accum: 1, lr: 5.0e-3, lr_schedule: constant, seed: 0,
                eval_every: 2, save_every: 2}}
        rl:
          num_generations: 4
          max_completion_len: 8
          temperature: 1.0
          sample_every: 2
          rewards: [{{function: length_penalty, max_chars: 6}}, {{function: regex_match, pattern: "[0-9]", weight: 0.5}}]
        output_dir: {root / name}
        """))
    return str(path)


def test_grpo_on_two_processes_trains_like_one(workdir):
    """grpo under torchrun (ddp): each process rolls out and trains on its share of each step's prompts (the
    same seeded completions as one process draws), evaluates its share of the validation prompts, and the
    losses, rewards, evaluation and adapter equal one process with twice the accumulation."""
    single = workdir / "grpo_single"
    _ok(_single(["train", _grpo_config(workdir, single.name), "--set", "train.grad_accum=2"]))
    out = workdir / "grpo_ddp"
    _ok(_torchrun(2, ["-m", "lorakit", "train", _grpo_config(workdir, out.name)]))
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (single, out)}
    for key in ("loss", "reward", "rewards/regex_match", "completion_length", "eval_reward"):
        two, one = ([r[key] for r in rows[run] if key in r] for run in (out, single))
        assert len(two) == len(one) > 0 and two == pytest.approx(one, rel=1e-5, abs=1e-7), key
    assert {r["step"] for r in rows[out] if "eval_reward" in r} == {2, 4}
    two, one = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (out, single))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in one.items() if "lora_B" in k)  # it trained


def test_grpo_under_fsdp_is_refused_with_what_to_set(workdir):
    done = _torchrun(2, ["-m", "lorakit", "train", _grpo_config(workdir, "grpo_fsdp"), "--set",
                         "distributed.strategy=fsdp"])
    assert done.returncode != 0
    assert "set distributed.strategy: ddp" in done.stdout + done.stderr
