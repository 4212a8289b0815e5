"""What compiling costs a run, the first time and again: speed.compile: on with a cold and a warm inductor cache.

Each row is one fresh worker of bench/train_speed.py (same model, batch 4 x 512, LoRA r=16 on q,k,v,o, AdamW):
  eager       the configuration without compile (lorakit-<dtype>)
  cold        lorakit-<dtype>-compile with TORCHINDUCTOR_CACHE_DIR an empty directory: everything compiles
  warm        the same again, in a new process, on the directory the cold run filled: what a second run of
              the same shape pays (dynamo still traces; inductor's FX graph and AOTAutograd caches answer)
  peft        PEFT's row of the same dtype (peft-<dtype>, train_speed.py), the reference
Rounds are interleaved (peft, eager, cold, warm, peft, eager, ...), each round with its own empty directory.

Columns: first s = the first step (compiling happens in it), s/step = median of the timed steps after it,
compile s = first s - s/step, cpu% over the timed steps (below 90: not valid). Break-even: the steps a run needs
before compiling has paid for itself, compile s / (eager s/step - compiled s/step).

Then a run of N = 1 + --steps steps as a user starts it, its wall time = first step + (N - 1) x s/step: PEFT,
and lorakit with what speed.compile: auto does at N steps (lorakit.train.speed: it compiles from
COMPILE_MIN_STEPS steps with a cold cache, from COMPILE_MIN_STEPS_WARM once the layers are in the cache),
against PEFT's time (x = PEFT's seconds / lorakit's: above 1 lorakit is faster); and each row's loss after its
last step (every row trains the same batch from the same weights, so the curves should end alike).

    python bench/compile_cache.py                       # 40m, this machine's dtype (bf16 with AMX/AVX512-BF16)
    python bench/compile_cache.py --preset 150m --dtype bf16 --rounds 2
    python bench/compile_cache.py --rounds 1 --steps 99             # a 100-step run as a user starts it
"""
import argparse, os, shutil, statistics, sys, tempfile

import harness
from train_speed import git_rev, machine

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="40m")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where the CPU has bf16 matrix units, else fp32 (lorakit's model.dtype auto)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dtype = args.dtype
    if dtype == "auto":
        flags = open("/proc/cpuinfo").read()
        dtype = "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"
    print(f"machine: {machine()}  loadavg {os.getloadavg()[0]:.2f}")
    print(harness.environment_line() + f"  git {git_rev()}")
    print(f"preset {args.preset}, {dtype}, batch 4 x 512, {args.rounds} interleaved rounds, 1 + {args.steps} steps each")
    rows = {"peft": [], "eager": [], "cold": [], "warm": []}
    for round_ in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="lorakit-inductor-")
        try:
            for kind, config in (("peft", f"peft-{dtype}"), ("eager", f"lorakit-{dtype}"),
                                 ("cold", f"lorakit-{dtype}-compile"), ("warm", f"lorakit-{dtype}-compile")):
                cmd = [sys.executable, os.path.join(HERE, "train_speed.py"), "--worker", config, "--preset", args.preset,
                       "--warmup", "1", "--steps", str(args.steps)]
                r = harness.run_worker(cmd, f"{kind}/{round_}", extra_env={"TORCHINDUCTOR_CACHE_DIR": cache})
                rows[kind].append(r)
                print(f"  round {round_ + 1} {kind:5}: first {r['first_sec']:6.2f} s, {r['sec']:.3f} s/step, "
                      f"loss {r['loss']:.4f} -> {r['last_loss']:.4f}, cpu {r['busy'] * 100:.0f}%", flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    med = {k: (statistics.median(r["first_sec"] for r in v), statistics.median(r["sec"] for r in v),
               min(r["busy"] for r in v)) for k, v in rows.items()}
    saving = med["eager"][1] - med["cold"][1]
    print(f"\n{'run':6} {'first s':>8} {'s/step':>7} {'compile s':>9} {'break-even steps':>16} {'cpu%':>5}")
    for kind, (first, sec, busy) in med.items():
        cost = first - sec
        even = "-" if kind in ("eager", "peft") else (f"{cost / saving:.0f}" if saving > 0 else "never (no saving)")
        flag = "" if busy >= 0.9 else "  CONTENDED: not valid"
        print(f"{kind:6} {first:8.2f} {sec:7.3f} {'-' if kind in ('eager', 'peft') else f'{cost:.1f}':>9} {even:>16} "
              f"{busy * 100:5.0f}{flag}")
    print(f"compiled step saves {saving:.3f} s ({saving / med['eager'][1] * 100:.0f}%) of the eager step")
    run_of_n(med, rows, 1 + args.steps)


def run_of_n(med: dict, rows: dict, n: int) -> None:
    """A run of n steps as a user starts it: PEFT, and lorakit as speed.compile: auto decides at n steps."""
    from lorakit.train.speed import COMPILE_MIN_STEPS, COMPILE_MIN_STEPS_WARM

    def total(kind):
        first, sec, _ = med[kind]
        return first + (n - 1) * sec

    peft = total("peft")
    cold = "cold" if n >= COMPILE_MIN_STEPS else "eager"
    warm = "warm" if n >= COMPILE_MIN_STEPS_WARM else "eager"
    print(f"\na run of {n} steps as a user starts it (first step + {n - 1} x s/step):")
    print(f"  {'run':36} {'wall s':>7} {'x PEFT':>7} {'last loss':>10}")
    for label, kind in (("PEFT", "peft"),
                        (f"lorakit, cold cache: auto {'compiles' if cold == 'cold' else 'stays eager'}", cold),
                        (f"lorakit, warm cache: auto {'compiles' if warm == 'warm' else 'stays eager'}", warm)):
        last = statistics.median(r["last_loss"] for r in rows[kind])
        flag = "" if med[kind][2] >= 0.9 else "  CONTENDED: not valid"
        print(f"  {label:36} {total(kind):7.0f} {peft / total(kind):7.2f} {last:10.4f}{flag}")


if __name__ == "__main__":
    main()
