"""What every benchmark here shares: allocator settings and running one measurement in a fresh process.

glibc malloc mmap()s every buffer above its (dynamic) threshold and munmap()s it on free, and jemalloc by
default purges freed pages after a few seconds, so each step re-faults its big activation buffers
(100k-800k minor faults per full-shape step); in a VM that hands freed pages back to the host
(virtio-balloon page reporting) that costs 15-30% of a step and is erratic. MALLOC_TUNE keeps freed
memory in the process; it is applied identically to every worker, skipped with --no-malloc-tune, and a
variable already set in the environment wins.
"""
import json, os, subprocess, sys

MALLOC_TUNE = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:"
                                 "glibc.malloc.top_pad=268435456",
               "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}  # jemalloc, if preloaded


def run_worker(cmd: list, label: str, *, malloc_tune: bool = True, extra_env: dict | None = None) -> dict:
    """Run `cmd` (a worker printing one `RESULT {json}` line) in a fresh process; exit naming `label` on failure."""
    env = dict(os.environ)
    for var, val in {**(MALLOC_TUNE if malloc_tune else {}), **(extra_env or {})}.items():
        env.setdefault(var, val)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {label} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def environment_line(threads: int = 0) -> str:
    """Library versions, CPU count, threads and load average: the first line every benchmark prints."""
    import torch
    from importlib.metadata import version
    return (f"torch {torch.__version__}  transformers {version('transformers')}  peft {version('peft')}  "
            f"lorakit {version('lorakit')}  cpus {os.cpu_count()}  threads {threads or torch.get_num_threads()}  "
            f"loadavg {os.getloadavg()[0]:.2f}")


def malloc_line(malloc_tune: bool = True) -> str:
    tune = MALLOC_TUNE if malloc_tune else {}
    return "  ".join(f"{v}={os.environ.get(v, tune.get(v)) or '-'}" for v in ("LD_PRELOAD", *MALLOC_TUNE))


class CpuClock:
    """Wall and process CPU time between start() and stop(); busy = CPU time / (wall * threads), where well
    below ~0.9 means another process competed for the cores."""

    def start(self) -> "CpuClock":
        import resource, time
        self._t0, self._r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return self

    def stop(self) -> dict:
        import resource, time
        import torch
        wall = time.perf_counter() - self._t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime + r1.ru_stime - self._r0.ru_utime - self._r0.ru_stime
        return dict(wall=wall, busy=cpu / (wall * torch.get_num_threads()) if wall > 0 else 0.0)


def chosen_configs(text: str, known) -> list[str]:
    """The comma-separated `--configs` value as a list; exit naming any that `known` lacks."""
    configs = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in configs if c not in known]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {', '.join(known)}")
    return configs
