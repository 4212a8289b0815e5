"""Benchmark lorakit against PEFT (the reference) on a Llama-shaped model.

Two cases, each run per side in a fresh subprocess so allocator/memory state of
one side cannot affect the other:

  train  forward + loss.backward() of a LoRA-wrapped model (labels = input_ids)
  mixed  no-grad eval forward with 4 adapters, one adapter name per batch row

Both sides build the same random base (fixed seed) and get identical LoRA A/B
values (seeded per (layer, proj, adapter, A|B), independent of parameter order),
so the first-step loss, LoRA grad norm and mixed-batch logits must agree.

    python bench/lora_step.py --quick     # smoke test, ~45 s (8 workers x ~4 s of imports)
    python bench/lora_step.py             # full shape, fp32 + bf16, ~3-4 min on 2 cores

Columns: ms = median step time (min-max over the timed steps), rate = tok/s (train) or
rows/s (mixed), cpu% = process CPU time / (wall * threads) over the timed steps (well
below ~90: other load on the machine, rerun), flt/step = minor page faults per step,
rss = the worker's peak RSS (ru_maxrss), lora = dtype of the LoRA weights.
"""
import argparse, json, os, re, resource, statistics, sys, tempfile, time, zlib

import harness
from harness import MALLOC_TUNE

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = ["a0", "a1", "a2", "a3"]
FULL = dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000, batch=4, seq=512, mixed_seq=128)
QUICK = dict(hidden=256, layers=4, heads=4, inter=688, vocab=32000, batch=2, seq=128, mixed_seq=32)
# LoRA param names: lorakit "...layers.3.self_attn.q_proj.lora_A.a0", PEFT adds ".weight".
LORA_RE = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\.([^.]+)(?:\.weight)?$")


# ----------------------------------------------------------------------------- worker side
def build_model(shape):
    """Random-weight Llama built from a config with a fixed seed (same on both sides)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      intermediate_size=shape["inter"], vocab_size=shape["vocab"],
                      max_position_embeddings=2048, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def wrap(side, model, adapters, args):
    """Inject LoRA adapters; returns (callable model, {(layer, proj, AB, adapter): param})."""
    kw = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    if side == "lorakit":
        import lorakit
        cfg = lorakit.LoraConfig(**kw)
        wrapped = lorakit.wrap(model, cfg, adapter_name=adapters[0])
    else:
        import peft
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", **kw)
        wrapped = peft.get_peft_model(model, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        wrapped.add_adapter(name, cfg)
    wrapped.set_adapter(adapters[0])
    params = {}
    for n, p in wrapped.named_parameters():
        m = LORA_RE.search(n) if ".lora_" in n else None
        if m:
            params[(int(m[1]), m[2], m[3], m[4])] = p
    assert len(params) == args.layers_n * len(TARGETS) * 2 * len(adapters), (side, len(params))
    return wrapped, params


def fill_lora(params):
    """Deterministic non-zero A and B, seeded by the key so parameter order doesn't matter."""
    import torch
    with torch.no_grad():
        for key, p in params.items():
            g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            std = p.shape[1] ** -0.5 if key[2] == "A" else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)


def timed(fn, warmup, steps):
    """-> (result of the first call, median s, (min s, max s), minor page faults per timed step,
    CPU busy fraction = process CPU time / (wall time * threads); well below 1 means contention)."""
    import torch
    first, times = None, []
    for i in range(warmup + steps):
        if i == warmup:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        first = res if i == 0 else first
        if i >= warmup:
            times.append(dt)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    busy = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (sum(times) * torch.get_num_threads())
    return first, statistics.median(times), (min(times), max(times)), (ru1.ru_minflt - ru0.ru_minflt) / steps, busy


def worker(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    args.layers_n = shape["layers"]
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.dtype]
    model = build_model(shape)
    adapters = ADAPTERS[:1] if args.case == "train" else ADAPTERS
    if args.adapter_dtype == "default":  # as a user would: cast the base, then wrap; adapter dtype
        model.to(dtype)                  # is each library's default (both keep fp32 on a bf16 base)
    lm, params = wrap(args.worker, model, adapters, args)
    fill_lora(params)
    if args.adapter_dtype == "model":  # whole wrapped model, LoRA params included, in the bench dtype
        lm.to(dtype)
    g = torch.Generator().manual_seed(1)
    out = dict(side=args.worker, case=args.case, dtype=args.dtype, torch=torch.__version__,
               threads=torch.get_num_threads(),
               lora_dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[next(iter(params.values())).dtype],
               jemalloc_loaded="libjemalloc" in open("/proc/self/maps").read())
    if args.case == "train":
        b, s = shape["batch"], shape["seq"]
        ids = torch.randint(0, shape["vocab"], (b, s), generator=g)
        lm.train()
        lora = list(params.values())

        def step():
            for p in lora:
                p.grad = None
            loss = lm(input_ids=ids, labels=ids).loss
            loss.backward()
            gn = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in lora))  # tiny LoRA tensors: negligible
            return loss.item(), gn.item()

        (out["loss"], out["grad_norm"]), sec, spread, faults, busy = timed(step, args.warmup, args.steps)
        out.update(shape=f"{b}x{s}", sec=sec, rate=b * s / sec, unit="tok/s")
    else:
        b, s = 8, shape["mixed_seq"] if args.mixed_seq <= 0 else args.mixed_seq
        ids = torch.randint(0, shape["vocab"], (b, s), generator=g)
        names = [ADAPTERS[i % len(ADAPTERS)] for i in range(b)]
        lm.eval()

        def fwd():
            with torch.no_grad():
                return lm(input_ids=ids, adapter_names=names).logits

        logits, sec, spread, faults, busy = timed(fwd, args.warmup, args.steps)
        torch.save(logits.float(), args.dump)
        out.update(shape=f"{b}x{s}", sec=sec, rate=b / sec, unit="rows/s")
    out.update(spread=spread, faults=faults, busy=busy)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
# Allocator settings and the fresh-process runner are shared with the other benchmarks: see harness.py.


def run_worker(args, side, case, dtype, dump):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--case", case,
           "--dtype", dtype, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--r", str(args.r), "--alpha", str(args.alpha),
           "--mixed-seq", str(args.mixed_seq), "--adapter-dtype", args.adapter_dtype, "--dump", dump]
    cmd += ["--quick"] if args.quick else []
    return harness.run_worker(cmd, f"{side}/{case}/{dtype}", malloc_tune=not args.no_malloc_tune)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--case", choices=["train", "mixed", "both"], default="both")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="fresh workers per side, interleaved; best median kept")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--mixed-seq", type=int, default=0, help="seq len of the 8-row mixed batch (0 = shape default)")
    ap.add_argument("--adapter-dtype", choices=["model", "default"], default="model",
                    help="model: cast the wrapped model (LoRA too) to --dtype; default: cast the base "
                         "before wrapping and keep each library's default adapter dtype")
    ap.add_argument("--quick", action="store_true", help="small shape for smoke tests")
    ap.add_argument("--no-malloc-tune", action="store_true", help="don't set GLIBC_TUNABLES / MALLOC_CONF for the workers")
    ap.add_argument("--worker", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from importlib.metadata import version
    shape = QUICK if args.quick else FULL
    print(f"torch {torch.__version__}  transformers {version('transformers')}  peft {version('peft')}  "
          f"cpus {os.cpu_count()}  loadavg {os.getloadavg()[0]:.2f}")
    tune = {} if args.no_malloc_tune else MALLOC_TUNE
    print("  ".join(f"{v}={os.environ.get(v, tune.get(v)) or '-'}" for v in ("LD_PRELOAD", *MALLOC_TUNE)))
    print(f"shape {shape}  r={args.r} alpha={args.alpha} targets={','.join(TARGETS)}  "
          f"warmup={args.warmup} steps={args.steps} (median, min-max) repeats={args.repeats} "
          f"adapter-dtype={args.adapter_dtype}")
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    cases = ["train", "mixed"] if args.case == "both" else [args.case]
    hdr = (f"{'case':6} {'dtype':5} {'side':8} {'shape':8} {'lora':5} {'thr':>3} {'jemal':>5} {'ms':>9} {'min-max ms':>15} "
           f"{'rate':>16} {'cpu%':>4} {'flt/step':>8} {'rss MiB':>8}  check")
    print(hdr + "\n" + "-" * len(hdr))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for dtype in dtypes:
                res = {}
                for _ in range(args.repeats):
                    for side in ("lorakit", "peft"):
                        r = run_worker(args, side, case, dtype, os.path.join(tmp, f"{side}.pt"))
                        res[side] = min(res.get(side, r), r, key=lambda x: x["sec"])
                for side, r in res.items():
                    check = f"loss {r['loss']:.6f} gnorm {r['grad_norm']:.6f}" if case == "train" else ""
                    lo, hi = r["spread"]
                    print(f"{case:6} {dtype:5} {side:8} {r['shape']:8} {r['lora_dtype']:5} {r['threads']:>3} "
                          f"{'yes' if r['jemalloc_loaded'] else 'no':>5} {r['sec'] * 1e3:9.1f} "
                          f"{f'{lo * 1e3:.0f}-{hi * 1e3:.0f}':>15} {r['rate']:10.1f} {r['unit']:5} "
                          f"{r['busy'] * 100:4.0f} {r['faults']:8.0f} {r['peak_rss_mib']:8.0f}  {check}", flush=True)
                k, p = res["lorakit"], res["peft"]
                if case == "train":
                    extra = f"|dloss| {abs(k['loss'] - p['loss']):.2e}  |dgnorm| {abs(k['grad_norm'] - p['grad_norm']):.2e}"
                else:  # logits of the last worker of each side (all runs are deterministic)
                    a, b = (torch.load(os.path.join(tmp, f"{s}.pt")) for s in ("lorakit", "peft"))
                    extra = f"logits max|diff| {(a - b).abs().max().item():.2e} (max|logit| {b.abs().max().item():.2f})"
                print(f"{'':6} {dtype:5} {'ratio':8} lorakit/peft speed = {k['rate'] / p['rate']:.3f}x "
                      f"(best step {p['spread'][0] / k['spread'][0]:.3f}x)   "
                      f"peak rss = {k['peak_rss_mib'] / p['peak_rss_mib']:.3f}x   {extra}", flush=True)


if __name__ == "__main__":
    main()
