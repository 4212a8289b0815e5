"""Training-step speed of lorakit against PEFT, with MFU and (--profile) where the CPU time goes.

One optimizer step on a Llama-shaped model with seeded random weights (bench/lora_step.py's build_model),
batch 4 x 512 random token ids, every token supervised, LoRA r=16 alpha=32 dropout 0 on q,k,v,o with the
same non-zero A and B on both sides (lora_step.fill_lora), AdamW lr 1e-4 weight_decay 0 (lorakit's default
decay; torch's is 0.01) over the LoRA weights only. Each configuration runs in a fresh process with
bench/harness.py's allocator settings:

  peft-fp32       fp32 base, fp32 LoRA; model(input_ids, labels).loss (transformers computes the loss)
  peft-bf16       base cast to bf16 before get_peft_model (PEFT keeps its adapters fp32); PEFT's best
  peft-autocast   fp32 base under torch.autocast("cpu", bfloat16) for the forward and loss
  lorakit-fp32    fp32 base; the step as lorakit.train.fit runs it: lm_loss_sum(model, inputs, labels,
                  loss_chunk_tokens) (the chunked head + cross-entropy; a frozen head fused, nothing recomputed), the summed
                  loss divided by the supervised tokens, backward, optimizer step, zero_grad
  lorakit-fp32-compile  the same with speed.compile: on
  lorakit-bf16-exact  base cast to bf16 before lorakit.wrap (adapters stay fp32, as lorakit does), LoRA
                  matmuls in fp32 as PEFT computes them (speed.adapter_compute: adapter)
  lorakit-bf16    the same with lorakit's default speed section minus compile: LoRA matmuls in bf16 on the
                  fp32 master weights (speed.adapter_compute: auto)
  lorakit-bf16-compile  + speed.compile: on (decoder layers and the loss's softmax through torch.compile;
                  compiling happens in the warm-up steps)
  The lorakit rows apply the speed section with lorakit.train.speed.setup_speed, as fit does.

fit also computes the grad norm and clips (max_grad_norm 1.0); neither side does that here.

    python bench/train_speed.py                          # presets 40m and 150m, 2 warm-up + 5 timed steps
    python bench/train_speed.py --preset 40m --profile   # + torch.profiler over 2 more steps per config
    python bench/train_speed.py --preset 40m --steps 2 --warmup 1 --configs peft-bf16,lorakit-bf16

Columns: s/step = median of the timed steps (min-max), tok/s = batch x seq / median, vs best = tok/s over
the highest tok/s of the peft-* configurations run, cpu% = process CPU time / (wall x threads) over the
timed steps (below ~90: another process competed for the cores; the row is flagged and not valid),
rss = peak RSS (ru_maxrss) of the worker, loss = the first step's loss (before any update).

MFU = model FLOPs per step / step time / matmul peak. The peak is measured once, up front, in a fresh
worker with the same threads: the best of repeated 2048 x 2048 x 2048 torch.mm, in bf16 and in fp32.
Model FLOPs are counted analytically (multiply-add = 2 FLOPs), T = batch x seq tokens:
  forward   2 x T x (P_frozen + P_lora) + attention 4 x layers x seq^2 x hidden x batch
            P_frozen = layers x (4 h^2 + 3 h i) + h V  (q,k,v,o; gate,up,down; lm_head; the embedding is a
            lookup), P_lora = layers x 4 targets x 2 r h  (A: h -> r, B: r -> h)
            attention: Q K^T and softmax(.) V, 2 x seq^2 x hidden each per row and layer, counted in full
            (a causal kernel may skip the upper half; MFU does not credit that)
  backward  frozen weights need only their input gradient: 2 x T x P_frozen_in, where P_frozen_in leaves
            out layer 0's q,k,v (their input, the normed embedding, needs no gradient);
            LoRA weights need input and weight gradients: 4 x T x P_lora;
            attention: dQ, dK from dS and dS, dV from dP: 2 x the forward, 8 x layers x seq^2 x hidden x batch
  training  forward + backward. Recomputation is not model work: lorakit's chunked loss runs the lm_head
            forward twice, and that second run is not counted (it lowers lorakit's MFU, as it should).
MFU is given against the bf16 peak for every row and against the fp32 peak for the fp32 rows.

--profile: after the timed steps, torch.profiler (CPU) records 2 more steps; the self CPU time of every
event is put in a category by an explicit table of op names (OP_CATEGORIES below; ops under the
optimizer's record_function go to "optimizer", non-matmul ops inside an autograd Function or backward
node whose name holds "Loss" go to "loss"); names the table misses go to "other" and the 5 largest are
listed so the table can be extended. Percentages are of the total self time of the 2 steps.
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time, types

import harness
from harness import MALLOC_TUNE
from lora_step import TARGETS, build_model, fill_lora, wrap

PRESETS = {
    "40m": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=32000),
    "150m": dict(hidden=768, layers=12, heads=12, inter=2048, vocab=32000),
}
CONFIGS = {  # name -> (side, base dtype, autocast, lorakit speed section)
    "peft-fp32": ("peft", "fp32", False, None),
    "peft-bf16": ("peft", "bf16", False, None),
    "peft-autocast": ("peft", "fp32", True, None),
    "lorakit-fp32": ("lorakit", "fp32", False, dict(compile="off")),
    "lorakit-fp32-compile": ("lorakit", "fp32", False, dict(compile="on")),
    "lorakit-bf16-exact": ("lorakit", "bf16", False, dict(compile="off", adapter_compute="adapter")),
    "lorakit-bf16": ("lorakit", "bf16", False, dict(compile="off")),
    "lorakit-bf16-compile": ("lorakit", "bf16", False, dict(compile="on")),
}

# ---- profile categories: exact aten op names (self time), checked in order after the optimizer context ----
_ELEMENTWISE = """add add_ sub sub_ rsub mul mul_ div div_ neg pow pow_ rsqrt sqrt sqrt_ mean sum silu silu_
silu_backward sigmoid sigmoid_backward tanh exp cat stack index_select embedding embedding_backward
embedding_dense_backward fill_ zero_ zeros_like ones_like where masked_fill masked_fill_ addcmul_ addcdiv_
lerp_ maximum minimum clamp clamp_ abs threshold_backward rms_norm _fused_rms_norm _fused_rms_norm_backward
cos sin arange gt lt ge le eq ne any all bitwise_not logical_not index index_put_ gather scatter_add_
sum_out isfinite linalg_vector_norm norm exp_ amax slice_backward constant_pad_nd pad""".split()
_VIEWS = """view reshape _reshape_alias _unsafe_view transpose t permute slice select expand expand_as
unsqueeze squeeze squeeze_ as_strided flatten unflatten split split_with_sizes chunk narrow unbind alias
detach detach_ empty empty_like empty_strided zeros ones new_empty new_zeros new_ones resize_ result_type
lift_fresh item _local_scalar_dense resolve_conj resolve_neg is_nonzero set_ numpy_T _has_compatible_shallow_copy_type
broadcast_tensors""".split()
OP_CATEGORIES = [
    ("attention bwd", """_scaled_dot_product_flash_attention_for_cpu_backward
        _scaled_dot_product_efficient_attention_backward _softmax_backward_data""".split()),
    ("attention", """scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
        _scaled_dot_product_attention_math _softmax softmax""".split()),
    ("matmul", "mm addmm addmm_ bmm baddbmm linear matmul _addmm_activation addmv dot".split()),
    ("loss", """log_softmax _log_softmax _log_softmax_backward_data nll_loss nll_loss_nd nll_loss_forward
        nll_loss_backward nll_loss2d_forward nll_loss2d_backward cross_entropy_loss cross_entropy logsumexp""".split()),
    ("casts/copies", "to _to_copy copy_ contiguous clone type_as _copy_from".split()),
    ("element-wise", _ELEMENTWISE),
    ("views/alloc", _VIEWS),
]
OP_TABLE = {f"aten::{op}": cat for cat, ops in OP_CATEGORIES for op in ops}
CATEGORY_ORDER = [c for c, _ in OP_CATEGORIES] + ["optimizer", "autograd engine", "python/unlabelled", "other"]


def categorize(name: str, ancestors: list[str]) -> str:
    if any(a.startswith("Optimizer.") for a in [name, *ancestors]):
        return "optimizer"  # the step's and zero_grad's own ops and their Python overhead
    cat = OP_TABLE.get(name)
    if cat != "matmul" and any("Loss" in a or "CrossEntropy" in a for a in [name, *ancestors]):
        return "loss"  # inside a loss function (e.g. lorakit's fused head + cross-entropy): its non-matmul ops
    if cat is not None:
        return cat
    if name.startswith("autograd::engine::") or name.endswith("Backward0") or name.endswith("Backward1"):
        return "autograd engine"  # the backward node's own time, not the kernels it calls
    if name.startswith("## "):
        return "python/unlabelled"  # our own record_function ranges: time not inside any op
    return "other"


def breakdown(prof) -> dict:
    """Self CPU time per category (ms over the profiled steps) and the largest 'other' ops."""
    cats, others = {}, {}
    for e in prof.events():
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        cat = categorize(e.name, chain)
        ms = e.self_cpu_time_total / 1e3
        cats[cat] = cats.get(cat, 0.0) + ms
        if cat == "other":
            others[e.name] = others.get(e.name, 0.0) + ms
    top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
    return dict(ms=cats, other_top=top)


# ---- model FLOPs -----------------------------------------------------------------------------------------
def train_flops(shape: dict, batch: int, seq: int, r: int) -> dict:
    """Analytic model FLOPs of one training step (the formula is in the module docstring)."""
    h, i, V, L = shape["hidden"], shape["inter"], shape["vocab"], shape["layers"]
    T = batch * seq
    p_frozen = L * (4 * h * h + 3 * h * i) + h * V
    p_frozen_in = p_frozen - 3 * h * h  # layer 0's q, k, v: their input needs no gradient
    p_lora = L * len(TARGETS) * 2 * r * h
    attn = 4 * L * seq * seq * h * batch
    fwd = 2 * T * (p_frozen + p_lora) + attn
    bwd = 2 * T * p_frozen_in + 4 * T * p_lora + 2 * attn
    return dict(forward=fwd, backward=bwd, total=fwd + bwd, p_frozen=p_frozen, p_lora=p_lora)


# ----------------------------------------------------------------------------- worker side
def peak_worker(args) -> None:
    """Best-of matmul FLOP/s, bf16 and fp32, n x n x n torch.mm."""
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n, out = args.peak_n, {"threads": torch.get_num_threads()}
    for label, dtype, reps in (("bf16", torch.bfloat16, 20), ("fp32", torch.float32, 8)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=c)
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        best = min(_time(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
        wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        out[label] = 2 * n ** 3 / best
        out[label + "_busy"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (wall * torch.get_num_threads())
    print("RESULT " + json.dumps(out), flush=True)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(args) -> None:
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    side, base_dtype, autocast, speed = CONFIGS[args.worker]
    shape = PRESETS[args.preset]
    model = build_model(shape)
    if base_dtype == "bf16":  # cast the base, then wrap: each library keeps its adapters fp32
        model.to(torch.bfloat16)
    lm, params = wrap(side, model, ["a0"], types.SimpleNamespace(r=args.r, alpha=args.alpha, layers_n=shape["layers"]))
    fill_lora(params)
    lora = list(params.values())
    assert all(p.dtype == torch.float32 for p in lora), {p.dtype for p in lora}
    lm.train()
    opt = torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=g)  # (batch, seq); labels = ids
    chunk = None if args.loss_chunk_tokens == "none" else int(args.loss_chunk_tokens)
    compiled = False
    if side == "lorakit":
        from lorakit.config import SpeedConfig
        from lorakit.train.chunked_loss import lm_loss_sum, split_head
        from lorakit.train.speed import setup_speed
        assert chunk is None or split_head(lm) is not None, "the chunked loss path was not taken"
        compiled = setup_speed(lm, SpeedConfig(**speed), total_steps=10 ** 6, checkpointing=False).compiled
    from torch.profiler import record_function

    def step() -> float:
        if side == "peft":
            with record_function("## forward ##"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = lm(input_ids=ids, labels=ids).loss
            value = loss.item()
        else:  # as fit: the summed loss over supervised tokens, divided by their count (all of them here)
            with record_function("## forward ##"):
                loss_sum, count = lm_loss_sum(lm, {"input_ids": ids, "use_cache": False}, ids, chunk, compiled=compiled)
                loss = loss_sum / count
            value = float(loss_sum.detach()) / count
        with record_function("## backward ##"):
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    times, first = [], None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        first = loss if i == 0 else first
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    timed = times[args.warmup:]
    busy = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (sum(timed) * torch.get_num_threads())
    out = dict(config=args.worker, side=side, speed=speed, base=base_dtype, autocast=autocast, loss=first, last_loss=loss,
               first_sec=times[0],  # the first step: with speed.compile, compiling happens in it
               sec=statistics.median(timed), spread=(min(timed), max(timed)), busy=busy,
               threads=torch.get_num_threads(), lora_dtype="fp32", chunk=chunk if side == "lorakit" else None,
               jemalloc_loaded="libjemalloc" in open("/proc/self/maps").read())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                step()
            out["profile_wall_ms"] = (time.perf_counter() - t0) * 1e3
        out["profile"] = breakdown(prof)
        out["profile_steps"] = args.profile_steps
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def machine() -> str:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        mem = 0.0
    isa = ",".join(x for x in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags) or "no avx512"
    return f"{model}  {os.cpu_count()} cpus  {isa}  {mem:.1f} GiB RAM  {platform.platform()}"


def git_rev() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "?"
    except OSError:
        return "?"


def common_args(args) -> list:
    return ["--threads", str(args.threads)]


def fmt_breakdown(prof: dict, steps: int) -> tuple[str, str]:
    ms = prof["ms"]
    total = sum(ms.values()) or 1.0
    parts = [f"{c} {ms[c] / total * 100:.0f}%" for c in sorted(ms, key=lambda c: -ms[c]) if ms[c] / total >= 0.005]
    detail = "  ".join(f"{c} {ms.get(c, 0.0) / steps:.0f}" for c in CATEGORY_ORDER if ms.get(c))
    return ", ".join(parts), detail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="40m,150m", help="comma-separated: " + ", ".join(PRESETS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--loss-chunk-tokens", default="1024",
                    help="lorakit's train.loss_chunk_tokens (default 1024, lorakit's default); 'none' = full logits")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every worker; 0 = torch default")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over --profile-steps more steps per config")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak measurement")
    ap.add_argument("--no-malloc-tune", action="store_true", help="don't set GLIBC_TUNABLES / MALLOC_CONF for the workers")
    ap.add_argument("--worker", choices=[*CONFIGS, "peak"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "peak":
        return peak_worker(args)
    if args.worker:
        args.preset = args.preset.split(",")[0]
        return worker(args)

    presets = args.preset.split(",")
    configs = args.configs.split(",")
    bad = [p for p in presets if p not in PRESETS] + [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown preset/config {', '.join(bad)}; presets: {', '.join(PRESETS)}; configs: {', '.join(CONFIGS)}")
    if args.loss_chunk_tokens != "none" and not args.loss_chunk_tokens.isdigit():
        ap.error("--loss-chunk-tokens: a positive integer or 'none'")

    import torch
    from importlib.metadata import version
    import lorakit
    me = os.path.abspath(__file__)
    tune = not args.no_malloc_tune
    print(f"machine: {machine()}  loadavg {os.getloadavg()[0]:.2f}")
    print(f"versions: torch {torch.__version__}  transformers {version('transformers')}  peft {version('peft')}  "
          f"lorakit {lorakit.__version__} (git {git_rev()})  python {platform.python_version()}")
    env = {} if not tune else MALLOC_TUNE
    print("allocator: " + "  ".join(f"{v}={os.environ.get(v, env.get(v)) or '-'}" for v in ("LD_PRELOAD", *MALLOC_TUNE)))
    print(f"settings: batch {args.batch} x seq {args.seq}, every token supervised; LoRA r={args.r} alpha={args.alpha} "
          f"dropout 0 on {','.join(TARGETS)}, fp32 adapters; AdamW lr {args.lr:g} weight_decay 0; "
          f"warmup {args.warmup} + {args.steps} timed steps (median); lorakit loss_chunk_tokens "
          f"{args.loss_chunk_tokens}; PEFT loss: transformers' model(labels=...).loss"
          + (f"; profiled: {args.profile_steps} steps" if args.profile else ""))

    peak = harness.run_worker([sys.executable, me, "--worker", "peak", "--peak-n", str(args.peak_n), *common_args(args)],
                              "peak", malloc_tune=tune)
    print(f"matmul peak ({args.peak_n}^3 torch.mm, best of several, {peak['threads']} threads): "
          f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s (cpu {peak['bf16_busy'] * 100:.0f}%), "
          f"fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s (cpu {peak['fp32_busy'] * 100:.0f}%)"
          + ("" if min(peak["bf16_busy"], peak["fp32_busy"]) >= 0.9 else "  CONTENDED: the peak, and so MFU, is not valid"))

    for preset in presets:
        shape = PRESETS[preset]
        fl = train_flops(shape, args.batch, args.seq, args.r)
        print(f"\n== preset {preset}: {shape}; frozen matmul params {fl['p_frozen'] / 1e6:.1f}M, LoRA {fl['p_lora'] / 1e6:.2f}M; "
              f"model FLOPs/step {fl['total'] / 1e9:.1f} G (fwd {fl['forward'] / 1e9:.1f} + bwd {fl['backward'] / 1e9:.1f})")
        res = {}
        for name in configs:
            cmd = [sys.executable, me, "--worker", name, "--preset", preset, "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
                   "--alpha", str(args.alpha), "--lr", str(args.lr), "--loss-chunk-tokens", args.loss_chunk_tokens,
                   "--profile-steps", str(args.profile_steps), *common_args(args)] + (["--profile"] if args.profile else [])
            res[name] = harness.run_worker(cmd, f"{preset}/{name}", malloc_tune=tune)
            print(f"  ran {name}: {res[name]['sec']:.2f} s/step, cpu {res[name]['busy'] * 100:.0f}%", flush=True)
        tokens = args.batch * args.seq
        peft_rates = {n: tokens / r["sec"] for n, r in res.items() if r["side"] == "peft"}
        best_name = max(peft_rates, key=peft_rates.get) if peft_rates else None
        hdr = (f"{'config':14} {'s/step':>7} {'min-max s':>11} {'tok/s':>8} {'vs PEFT best':>12} {'MFU bf16pk':>10} "
               f"{'MFU fp32pk':>10} {'cpu%':>4} {'rss MiB':>7} {'loss step 1':>12}  note")
        print(hdr + "\n" + "-" * len(hdr))
        for name, r in res.items():
            rate = tokens / r["sec"]
            mfu = fl["total"] / r["sec"]
            ratio = f"{rate / peft_rates[best_name]:.2f}x" if best_name else "-"
            mfu32 = f"{mfu / peak['fp32'] * 100:9.1f}%" if r["base"] == "fp32" and not r["autocast"] else f"{'-':>10}"
            notes = []
            if r["busy"] < 0.9:
                notes.append("CONTENDED (cpu% < 90): not valid")
            if name == best_name:
                notes.append("PEFT best")
            lo, hi = r["spread"]
            print(f"{name:14} {r['sec']:7.3f} {f'{lo:.2f}-{hi:.2f}':>11} {rate:8.1f} {ratio:>12} "
                  f"{mfu / peak['bf16'] * 100:9.1f}% {mfu32} {r['busy'] * 100:4.0f} {r['peak_rss_mib']:7.0f} "
                  f"{r['loss']:12.6f}  {'; '.join(notes)}")
        # first-step losses: same weights, same LoRA values, same tokens; only precision may differ
        print("loss check (first step, before any update):")
        pairs = [("lorakit-fp32", "peft-fp32", 1e-4), ("lorakit-bf16", "peft-bf16", 5e-3),
                 ("peft-autocast", "peft-fp32", 1e-2), ("peft-bf16", "peft-fp32", 1e-2), ("lorakit-bf16", "peft-fp32", 1e-2)]
        for a, b, tol in pairs:
            if a in res and b in res:
                d = abs(res[a]["loss"] - res[b]["loss"])
                print(f"  {a} vs {b}: |dloss| {d:.2e} (tolerance {tol:g}) {'ok' if d <= tol else 'MISMATCH'}")
        if args.profile:
            print(f"self CPU time by category ({args.profile_steps} profiled steps; ms/step in the second line):")
            for name, r in res.items():
                pr = r["profile"]
                pct, detail = fmt_breakdown(pr, r["profile_steps"])
                total = sum(pr["ms"].values()) / r["profile_steps"]
                print(f"  {name:14} {pct}")
                print(f"  {'':14} ms/step: {detail}  (self-time sum {total:.0f}, wall "
                      f"{r['profile_wall_ms'] / r['profile_steps']:.0f})")
                if pr["other_top"]:
                    print(f"  {'':14} top 'other': " + ", ".join(f"{n} {ms / r['profile_steps']:.1f} ms" for n, ms in pr["other_top"]))


if __name__ == "__main__":
    main()
