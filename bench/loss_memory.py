"""Memory of one LoRA training step with a large vocabulary: the full logits against lorakit's chunked loss.

A small Llama-shaped model (hidden 512, 4 layers) with a 32k and a 152k vocabulary, bf16 base, LoRA r=16 on
q,k,v,o (fp32 adapters, each library's default), one forward + backward of a (batch, 2048) batch whose every
token is supervised (the worst case for lorakit: with masked prompts only the supervised positions reach the
head). Three sides, each in a fresh process with the allocator settings of bench/harness.py:

  peft     PEFT + transformers, the usual way: model(input_ids, labels=labels).loss
  lk-none  lorakit, train.loss_chunk_tokens: null (the full logits, as fit computes them)
  lk-1024  lorakit, train.loss_chunk_tokens: 1024 (the default: lm_head + loss 1024 tokens at a time)
           (--chunks 1024,256 adds lk-256, and so on)

Both libraries get the same random base (fixed seed) and the same non-zero A and B (bench/lora_step.py's
fill_lora), so the first-step loss and LoRA grad norm must agree (the check column).

    python bench/loss_memory.py            # 32k and 152k vocab, batch 2 x 2048, ~3-4 min on 2 cores
    python bench/loss_memory.py --quick    # seq 256: a smoke test

Columns: peak MiB = the worker's peak RSS (ru_maxrss), model building included; step +MiB = the peak RSS
during the steps above the RSS right after loading (the kernel's high-water mark is reset after loading),
the fairer number: it is what the step itself needs; s/step = median over the timed steps (min-max); cpu% =
process CPU time / (wall * threads) (well below ~90: another process competed for the cores; times are then
not valid, memory still is). Ratios are against PEFT.
"""
import argparse, json, os, resource, sys, types

import harness
from harness import MALLOC_TUNE
from lora_step import TARGETS, build_model, fill_lora, timed, wrap

SHAPE = dict(hidden=512, layers=4, heads=8, inter=1376)


def _status_kib(field):
    """VmRSS / VmHWM of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM, and so ru_maxrss) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- worker side
def worker(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPE, vocab=args.vocab)
    model = build_model(shape).to(torch.bfloat16)  # bf16 base; the adapters below stay fp32 on both sides
    side = "peft" if args.worker == "peft" else "lorakit"
    lm, params = wrap(side, model, ["a0"], types.SimpleNamespace(r=16, alpha=32, layers_n=shape["layers"]))
    fill_lora(params)
    lm.train()
    lora = list(params.values())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    if side == "lorakit":
        from lorakit.train.chunked_loss import lm_loss_sum, split_head
        chunk = None if args.worker == "lk-none" else int(args.worker.split("-")[1])
        assert chunk is None or split_head(lm) is not None, "the chunked path was not taken"

    def step():
        for p in lora:
            p.grad = None
        if side == "peft":
            loss = lm(input_ids=ids, labels=ids).loss
        else:  # as lorakit's fit computes it: summed over supervised tokens, divided by their count
            loss_sum, count = lm_loss_sum(lm, {"input_ids": ids, "use_cache": False}, ids, chunk)
            loss = loss_sum / count
        loss.backward()
        gn = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in lora))
        return loss.item(), gn.item()

    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    (loss, gnorm), sec, spread, _, busy = timed(step, args.warmup, args.steps)
    step_peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = dict(side=args.worker, vocab=args.vocab, shape=f"{args.batch}x{args.seq}", loss=loss, grad_norm=gnorm,
               sec=sec, spread=spread, busy=busy, threads=torch.get_num_threads(), peak_reset=reset,
               peak_rss_mib=max(load_peak, step_peak) / 1024, baseline_mib=baseline / 1024,
               step_mib=(step_peak - baseline) / 1024)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def run_worker(args, side, vocab):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--vocab", str(vocab),
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    return harness.run_worker(cmd, f"{side}/vocab {vocab}", malloc_tune=not args.no_malloc_tune)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="32000,151936", help="comma-separated vocabulary sizes")
    ap.add_argument("--chunks", default="1024", help="comma-separated loss_chunk_tokens values, one lorakit side each")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    ap.add_argument("--quick", action="store_true", help="seq 256: a smoke test")
    ap.add_argument("--no-malloc-tune", action="store_true", help="don't set GLIBC_TUNABLES / MALLOC_CONF for the workers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # peft, lk-none or lk-<chunk tokens>
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seq = 256
    if args.worker:
        return worker(args)

    import torch
    from importlib.metadata import version
    print(f"torch {torch.__version__}  transformers {version('transformers')}  peft {version('peft')}  "
          f"cpus {os.cpu_count()}  loadavg {os.getloadavg()[0]:.2f}")
    tune = {} if args.no_malloc_tune else MALLOC_TUNE
    print("  ".join(f"{v}={os.environ.get(v, tune.get(v)) or '-'}" for v in ("LD_PRELOAD", *MALLOC_TUNE)))
    print(f"shape {SHAPE} bf16 base, LoRA r=16 alpha=32 on {','.join(TARGETS)} (fp32), batch {args.batch}x{args.seq} "
          f"all tokens supervised; warmup={args.warmup} steps={args.steps} (median, min-max)")
    hdr = (f"{'vocab':>6} {'side':8} {'peak MiB':>8} {'step +MiB':>9} {'base MiB':>8} {'s/step':>7} "
           f"{'min-max s':>11} {'cpu%':>4}  check")
    print(hdr + "\n" + "-" * len(hdr))
    sides = ["peft", "lk-none"] + [f"lk-{int(c)}" for c in args.chunks.split(",")]
    for vocab in (int(v) for v in args.vocabs.split(",")):
        res = {side: run_worker(args, side, vocab) for side in sides}
        for side, r in res.items():
            lo, hi = r["spread"]
            mark = "" if r["peak_reset"] else " (peak not reset: includes loading)"
            print(f"{vocab:>6} {side:8} {r['peak_rss_mib']:8.0f} {r['step_mib']:9.0f} {r['baseline_mib']:8.0f} "
                  f"{r['sec']:7.2f} {f'{lo:.2f}-{hi:.2f}':>11} {r['busy'] * 100:4.0f}  "
                  f"loss {r['loss']:.6f} gnorm {r['grad_norm']:.6f}{mark}", flush=True)
        p = res["peft"]
        for side in sides[1:]:
            k = res[side]
            print(f"{vocab:>6} {side + '/peft':16} peak rss {k['peak_rss_mib'] / p['peak_rss_mib']:.3f}x   "
                  f"step +rss {k['step_mib'] / p['step_mib']:.3f}x   time {k['sec'] / p['sec']:.3f}x   "
                  f"|dloss| {abs(k['loss'] - p['loss']):.2e}  |dgnorm| {abs(k['grad_norm'] - p['grad_norm']):.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
