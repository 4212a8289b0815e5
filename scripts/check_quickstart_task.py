#!/usr/bin/env python
"""Evidence that the quickstart task is learnable fast: a minimal plain-PyTorch LoRA loop on the shipped assets.

    python scripts/check_quickstart_task.py [--assets DIR] [--steps 150] [--lr 2e-3] [--r 16]

Loads src/lorakit/quickstart/assets/model with transformers (offline), wraps it with lorakit.wrap, trains on
data/train.jsonl with the loss on the assistant reply tokens only (prompt masked with -100), and prints the wall
time, the validation loss before/after and the base vs adapted greedy replies on data/demo_prompts.json. It then
merges (merge_and_unload) and checks that the merged model gives the same greedy replies.
Not part of the test suite (it takes about a minute); it is the measurement behind the quickstart settings.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit

ASSETS = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "quickstart" / "assets"


def encode(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert full[:len(prompt)] == prompt
    labels = [-100] * len(prompt) + full[len(prompt):]
    # the template ends the turn with "<|im_end|>\n": keep <|im_end|> in the loss, drop the trailing newline
    if tok.decode(full[-1:]) == "\n":
        labels[-1] = -100
    return full[:max_len], labels[:max_len]


def batches(rows, bs, pad_id, rng=None):
    idx = list(range(len(rows)))
    if rng is not None:
        rng.shuffle(idx)
    for i in range(0, len(idx), bs):
        chunk = [rows[j] for j in idx[i:i + bs]]
        n = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [pad_id] * (n - len(x)) for x, _ in chunk])
        lab = torch.tensor([y + [-100] * (n - len(y)) for _, y in chunk])
        att = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in chunk])
        yield ids, att, lab


@torch.no_grad()
def val_loss(model, rows, pad_id) -> float:
    model.eval()
    tot, n = 0.0, 0
    for ids, att, lab in batches(rows, 50, pad_id):
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tgt = lab[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        tot += loss.item()
        n += (tgt != -100).sum().item()
    return tot / n


@torch.no_grad()
def greedy(model, tok, prompt: str) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=ASSETS)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.time()

    tok = AutoTokenizer.from_pretrained(args.assets / "model")
    model = AutoModelForCausalLM.from_pretrained(args.assets / "model", dtype=torch.float32)
    read = lambda name: [json.loads(line) for line in open(args.assets / "data" / name)]
    train = [encode(tok, r["messages"], args.max_len) for r in read("train.jsonl")]
    val = [encode(tok, r["messages"], args.max_len) for r in read("val.jsonl")]
    demo = json.loads((args.assets / "data" / "demo_prompts.json").read_text())
    pad = tok.pad_token_id

    base_out = [greedy(model, tok, d["prompt"]) for d in demo]
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora = lorakit.wrap(model, lorakit.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets))
    print(lora.trainable_parameters())
    v0 = val_loss(lora, val, pad)
    print(f"val loss before: {v0:.4f}")

    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(1, args.steps - warm))))
    rng = random.Random(0)
    step, t0 = 0, time.time()
    while step < args.steps:
        for ids, att, lab in batches(train, args.bs, pad, rng):
            lora.train()
            loss = lora(input_ids=ids, attention_mask=att, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in lora.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 25 == 0 or step == args.steps:
                print(f"step {step:4d}  train loss {loss.item():.4f}  val loss {val_loss(lora, val, pad):.4f}"
                      f"  {time.time() - t0:5.1f}s", flush=True)
            if step == args.steps:
                break
    t_train = time.time() - t0
    lora.eval()
    adapted = [greedy(lora, tok, d["prompt"]) for d in demo]
    merged = lora.merge_and_unload()
    merged_out = [greedy(merged, tok, d["prompt"]) for d in demo]
    v1 = val_loss(merged, val, pad)
    print(f"\ntrain wall time {t_train:.1f}s for {args.steps} steps (batch {args.bs}); total {time.time() - t_all:.1f}s")
    print(f"val loss before {v0:.4f} -> after {v1:.4f}")
    ok = 0
    for d, b, a, m in zip(demo, base_out, adapted, merged_out):
        ok += a == d["expected"]
        print(f"\nprompt:   {d['prompt']}\nexpected: {d['expected']}\nbase:     {b}\nadapted:  {a}"
              f"{'   [exact]' if a == d['expected'] else ''}")
        if m != a:
            print(f"merged:   {m}   [DIFFERS from adapted]")
    print(f"\nexact match on demo prompts: {ok}/{len(demo)}; merged == adapted: {merged_out == adapted}")


if __name__ == "__main__":
    main()
