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
