"""K adapters trained together in one batch (lorakit `tasks:`) against training them one after another.

A Llama-shaped model (hidden 512, 8 layers, vocab 32000; --quick: smaller), LoRA r=16 on q,k,v,o, fp32 adapters,
AdamW. Each task contributes `batch` rows of `seq` tokens per step, every token supervised. Sides, each in a
fresh process (bench/harness.py allocator settings):

  peft-bf16      PEFT + transformers, one adapter, bf16 base weights: one task's step (K of them = one round)
  peft-autocast  the same with an fp32 base under torch.autocast(bfloat16) (PEFT's best on this CPU so far)
  lk-one         lorakit, one adapter, bf16 base, the step as fit runs it (lm_loss_sum, speed defaults, no compile)
  lk-joint       lorakit, K adapters, one step over K x batch rows, each row routed to its task's adapter
                 (train/tasks.py: task_loss_sums, each task's loss over its own tokens, clipped per adapter)

"round" = the time to give every one of the K adapters one optimizer step: K x a one-adapter step, or one joint
step. Ratios are against the best PEFT side. rss = the worker's peak RSS (ru_maxrss, model building included).

    python bench/multi_task.py            # K=4, batch 2 x 256 per task, about 3 minutes on 2 cores
    python bench/multi_task.py --quick    # smaller shape: a smoke test
"""
import argparse, json, resource, sys

import harness
from lora_step import TARGETS, build_model, fill_lora, timed, wrap

FULL = dict(hidden=512, layers=8, heads=8, inter=1376, vocab=32000)
QUICK = dict(hidden=128, layers=2, heads=4, inter=344, vocab=32000)
SIDES = ("peft-bf16", "peft-autocast", "lk-one", "lk-joint")


def worker(args):
    import torch

    from lorakit.config import SpeedConfig
    from lorakit.data.collate import collate
    from lorakit.data.prepare import Example
    from lorakit.train.chunked_loss import lm_loss_sum
    from lorakit.train.speed import setup_speed
    from lorakit.train.tasks import adapter_parameters, clip_by_task, joint_batch, supervised_by_task, task_loss_sums

    shape = QUICK if args.quick else FULL
    side = args.worker
    joint = side == "lk-joint"
    names = [f"t{k}" for k in range(args.k)] if joint else ["t0"]
    model = build_model(shape)
    if side != "peft-autocast":
        model = model.to(torch.bfloat16)
    lib = "peft" if side.startswith("peft") else "lorakit"
    lm, params = wrap(lib, model, names, argparse.Namespace(r=16, alpha=32, layers_n=shape["layers"]))
    fill_lora(params)
    lm.train()
    if lib == "lorakit":
        lm.set_adapter(names)
        setup_speed(lm, SpeedConfig(compile="off"), total_steps=1, checkpointing=False)
    trainable = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    per_task = []
    for _ in names:
        rows = [torch.randint(0, shape["vocab"], (args.seq,), generator=g).tolist() for _ in range(args.batch)]
        per_task.append(collate([Example(r, r, "bench") for r in rows], 0))
    batch = joint_batch(list(zip(names, per_task)), 0) if joint else per_task[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    owned = adapter_parameters(lm, names, trainable) if joint else None
    counts = supervised_by_task([batch], names) if joint else None

    def step():
        if joint:
            sums = task_loss_sums(lm, inputs, batch, names, 1024)
            sum(sums[n] / counts[n] for n in names).backward()
            clip_by_task(owned, 1.0)
            loss = float(sum(s.detach() for s in sums.values())) / sum(counts.values())
        elif lib == "lorakit":
            total, count = lm_loss_sum(lm, inputs, batch["labels"], 1024)
            (total / count).backward()
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            loss = float(total) / count
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side == "peft-autocast"):
                out = lm(**inputs, labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            loss = float(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    loss, median, (lo, hi), _, busy = timed(step, args.warmup, args.steps)
    rounds = median if joint else median * args.k
    print("RESULT " + json.dumps(dict(side=side, step_s=median, min_s=lo, max_s=hi, round_s=rounds, busy=busy,
                                      loss=loss, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                      threads=torch.get_num_threads())), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=4, help="tasks (adapters)")
    parser.add_argument("--batch", type=int, default=2, help="rows per task per step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-malloc-tune", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.seq, args.warmup, args.steps = 64, 1, 2
    shape = QUICK if args.quick else FULL
    print(f"shape {shape}, K={args.k} tasks x batch {args.batch} x seq {args.seq}, LoRA r=16 on {','.join(TARGETS)}, "
          f"fp32 adapters, AdamW; malloc tune {'off' if args.no_malloc_tune else harness.MALLOC_TUNE}", flush=True)
    results = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--worker", side, "--k", str(args.k), "--batch", str(args.batch),
               "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
        results[side] = r = harness.run_worker(cmd, side, malloc_tune=not args.no_malloc_tune)
        print(f"{side:14} step {r['step_s']:6.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})  round of {args.k} "
              f"{r['round_s']:6.3f} s  rss {r['peak_rss_mib']:6.0f} MiB  cpu {r['busy'] * 100:3.0f}%  "
              f"threads {r['threads']}  loss {r['loss']:.4f}", flush=True)
    best = min(("peft-bf16", "peft-autocast"), key=lambda s: results[s]["round_s"])
    for side in ("lk-one", "lk-joint"):
        r, p = results[side], results[best]
        print(f"{side} vs {best}: round time {p['round_s'] / r['round_s']:.2f}x faster, peak rss "
              f"{r['peak_rss_mib'] / p['peak_rss_mib']:.2f}x")
    one, both = results["lk-one"], results["lk-joint"]
    print(f"lk-joint vs lk-one (same library, together vs one after another): {one['round_s'] / both['round_s']:.2f}x "
          f"faster, peak rss {both['peak_rss_mib'] / one['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
