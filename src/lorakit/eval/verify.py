"""`lorakit verify`: what each deployment format of an adapter costs, before it ships.

The reference is lorakit itself: the base with the adapter unmerged, in float32. Each format is then asked the
same things: its greedy answers to held-out prompts (token for token, compared with the reference's) and its
perplexity on the validation records' answers (the tokens training scores). Formats: the merged Hugging Face
model (`hf`), merged GGUF files in each --quant run by llama.cpp (`gguf-f16`, `gguf-q4_k_m`, ...), and the base
as a GGUF file plus the adapter as a GGUF LoRA (`lora-gguf`): on the user's own file when the base is one, else
on an f16 export of the base. llama.cpp runs in a child process (llama-cpp-python), one per file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

# llama.cpp in a child process: greedy ids for each prompt (the end-of-sequence token that stops one included,
# as lorakit's engine reports it) and the summed negative log-likelihood of each scored sequence's labels.
_LLAMA_CPP = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(job["model"], lora_path=job["lora"] or None, n_ctx=job["n_ctx"], n_threads=job["threads"],
            logits_all=True, verbose=False)
stop = set(job["stop"])
answers = []
for ids in job["prompts"]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token in stop or len(out) >= job["max_new_tokens"]:
            break
    answers.append(out)
nll, count = 0.0, 0
for ids, labels in job["scored"]:
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for t in range(1, len(ids)):
        if labels[t] != -100:
            nll -= logp[t - 1, labels[t]]
            count += 1
llm.close()
print(json.dumps({"answers": answers, "nll": nll, "tokens": count}))
"""


@dataclass
class FormatResult:
    name: str
    file: str | None
    bytes: int | None
    answers: list[list[int]] = field(default_factory=list)
    loss: float | None = None
    tokens: int = 0

    @property
    def perplexity(self) -> float | None:
        return None if self.loss is None else math.exp(min(self.loss, 700.0))


def agreement(reference: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> float:
    """The share of prompts whose greedy ids equal the reference's, token for token."""
    return sum(list(a) == list(b) for a, b in zip(reference, answers)) / max(len(reference), 1)


def common_prefix(reference: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> float:
    """The mean share of each reference answer that the format's answer starts with (1.0: all of it)."""
    shares = []
    for a, b in zip(reference, answers):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(a), 1))
    return sum(shares) / max(len(shares), 1)


def run_llama_cpp(model_file: Path, lora_file: Path | None, prompts: list[list[int]],
                  scored: list[tuple[list[int], list[int]]], *, stop: Sequence[int], max_new_tokens: int, n_ctx: int,
                  work: Path, threads: int = 2) -> tuple[list[list[int]], float, int]:
    """(greedy ids per prompt, each ending at a `stop` id or max_new_tokens; summed NLL; scored tokens) from
    llama.cpp on `model_file` (+ `lora_file`)."""
    from ..errors import ExportError

    job = work / f"{model_file.stem}.job.json"
    job.write_text(json.dumps({"model": str(model_file), "lora": str(lora_file or ""), "prompts": prompts,
                               "scored": scored, "stop": sorted(stop), "max_new_tokens": max_new_tokens, "n_ctx": n_ctx,
                               "threads": threads}))
    done = subprocess.run([sys.executable, "-c", _LLAMA_CPP, str(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"llama.cpp failed on {model_file.name}"
                          f"{' with ' + lora_file.name if lora_file else ''} (exit {done.returncode}): "
                          f"{done.stderr.strip()[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["answers"], result["nll"], result["tokens"]


def torch_nll(model: torch.nn.Module, scored: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """The same sums from a transformers (or lorakit) model, one sequence at a time, in float64 at the end."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in scored:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = torch.tensor(labels[1:])
            keep = target != -100
            nll -= logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum().item()
            count += int(keep.sum())
    return nll, count


def table(reference: FormatResult, results: Sequence[FormatResult]) -> str:
    head = ["format", "size", "same answer", "same prefix", "perplexity", "vs lorakit"]
    rows = [head]
    for r in [reference, *results]:
        ppl = r.perplexity
        change = "" if r is reference or ppl is None or reference.perplexity is None else \
            f"{100 * (ppl / reference.perplexity - 1):+.2f}%"
        rows.append([r.name, _size(r.bytes), f"{agreement(reference.answers, r.answers):.3f}",
                     f"{common_prefix(reference.answers, r.answers):.3f}", "-" if ppl is None else f"{ppl:.4f}",
                     change])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def as_json(reference: FormatResult, results: Sequence[FormatResult], prompts: int) -> dict[str, Any]:
    return {"prompts": prompts, "reference": reference.name,
            "formats": [{"name": r.name, "file": r.file, "bytes": r.bytes, "loss": r.loss,
                         "perplexity": r.perplexity, "tokens": r.tokens,
                         "same_answer": agreement(reference.answers, r.answers),
                         "same_prefix": common_prefix(reference.answers, r.answers)}
                        for r in [reference, *results]]}


def _size(n: int | None) -> str:
    from ..gguf_base import human_bytes

    return "-" if n is None else human_bytes(n)
