"""Serving many adapters on one base: `lorakit serve` under concurrent clients, mixed adapters against one at a time.

A small Llama-shaped model (random weights, word-level 32000 tokenizer) with K LoRA adapters (r=16 on
q,k,v,o, non-zero B), served by `lorakit serve` in a fresh process on loopback. N client threads send
/v1/completions requests (greedy, a fixed prompt length, max_tokens fixed) over HTTP, each naming one of the
K adapters in turn. Three ways to run the same requests:

  single   K = 1: every request uses the same adapter (the engine's best case)
  mixed    K adapters interleaved: the engine batches rows of different adapters together (grouped per
           adapter inside each layer)
  switch   the same K-adapter requests, but only one adapter's requests in flight at a time (all of
           adapter 1's, then adapter 2's...): what a server that cannot mix adapters in a batch does
  peft     reference, no server: PEFT's generate with adapter_names on the same model, adapters and prompts,
           as static batches of N rows (left padding), in a fresh process

Reported: requests/s, generated tokens/s, latency p50/p90/p99 per request, and mixed/single and
mixed/switch throughput ratios (target: with 4 adapters mixed, at least 0.8x the single-adapter throughput).

    python bench/serve.py                     # K = 1, 4, 16; N = 8 clients; ~5 min on 2 cores
    python bench/serve.py --quick             # tiny model, K = 1, 4: a smoke test
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, threading, time, zlib
from pathlib import Path

SHAPES = {"small": dict(hidden=512, inter=1376, layers=4, heads=8, vocab=32000),
          "tiny": dict(hidden=64, inter=128, layers=2, heads=4, vocab=32000)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(root: Path, shape: dict, adapters: int) -> tuple[Path, list[tuple[str, Path]]]:
    """Base model directory and `adapters` adapter directories under `root` (reused when present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from memory_7b import save_tokenizer
    import lorakit

    base = root / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                                             num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                             num_key_value_heads=shape["heads"], vocab_size=shape["vocab"],
                                             max_position_embeddings=2048, eos_token_id=2, bos_token_id=1))
        model.save_pretrained(base)
        save_tokenizer(base, shape["vocab"])
    out = []
    for i in range(adapters):
        path = root / f"adapter{i}"
        if not (path / "adapter_model.safetensors").is_file():
            model = LlamaForCausalLM.from_pretrained(base)
            lora = lorakit.wrap(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
            with torch.no_grad():
                for n, p in lora.named_parameters():
                    if ".lora_" in n:
                        g = torch.Generator().manual_seed(zlib.crc32(f"{i}:{n}".encode()))
                        p.copy_(torch.randn(p.shape, generator=g) * (0.05 if ".lora_B." in n else p.shape[1] ** -0.5))
            lora.save_adapter(path)
        out.append((f"a{i}", path))
    return base, out


def prompts(n: int, length: int, vocab: int) -> list[str]:
    import random
    rng = random.Random(0)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(length)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapters, args) -> tuple[subprocess.Popen, str]:
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--port", str(port), "--dtype", args.dtype,
           "--max-batch-size", str(args.clients), "--max-tokens", str(args.max_tokens)]
    for name, path in adapters:
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"server failed to start:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not come up in 120 s")


def run_clients(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send `jobs` (model, prompt) from `clients` threads; -> wall time, latencies, tokens."""
    import httpx
    lock, latencies, tokens, errors = threading.Lock(), [], [0], []
    queue = list(reversed(jobs))

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    model, prompt = queue.pop()
                t0 = time.perf_counter()
                r = http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                             "temperature": 0})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text[:200])
                        continue
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"wall": wall, "latencies": latencies, "tokens": tokens[0], "requests": len(latencies)}


def summary(r: dict) -> dict:
    lat = sorted(r["latencies"])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"req_s": r["requests"] / r["wall"], "tok_s": r["tokens"] / r["wall"], "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "requests": r["requests"], "tokens": r["tokens"]}


def peft_worker(args) -> None:
    """PEFT generate with adapter_names, static batches of `clients` rows; prints RESULT json."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    names = args.adapter_names.split(",")
    paths = args.adapter_paths.split(",")
    tok = AutoTokenizer.from_pretrained(args.base)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype))
    model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for n, p in zip(names[1:], paths[1:]):
        model.load_adapter(p, adapter_name=n)
    model.eval()
    texts = prompts(args.requests, args.prompt_len, SHAPES[args.shape]["vocab"])
    rows = [names[i % len(names)] for i in range(args.requests)]
    t0, tokens, latencies = time.perf_counter(), 0, []
    for start in range(0, args.requests, args.clients):
        b0 = time.perf_counter()
        batch = tok(texts[start:start + args.clients], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, adapter_names=rows[start:start + args.clients], max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        latencies += [time.perf_counter() - b0] * out.shape[0]
    print("RESULT " + json.dumps({"wall": time.perf_counter() - t0, "latencies": latencies, "tokens": tokens,
                                  "requests": args.requests}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="1,4,16", help="comma-separated K values")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", help="where the model and adapters are written (default: a temp dir)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--base", "--adapter-names", "--adapter-paths"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_worker:
        return peft_worker(args)
    if args.quick:
        args.shape, args.adapters, args.requests, args.max_tokens = "tiny", "1,4", 16, 8
    ks = [int(k) for k in args.adapters.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    base, adapters = build(root, SHAPES[args.shape], max(ks))
    import torch, transformers
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  cpus {os.cpu_count()}  "
          f"loadavg {os.getloadavg()[0]:.2f}")
    print(f"shape {args.shape} {SHAPES[args.shape]}, {args.dtype}; LoRA r=16 on {','.join(TARGETS)}; {args.requests} "
          f"requests of {args.prompt_len} prompt words, max_tokens {args.max_tokens}, greedy, {args.clients} clients "
          f"(server --max-batch-size {args.clients})")
    texts = prompts(args.requests, args.prompt_len, SHAPES[args.shape]["vocab"])
    results = {}
    proc, url = start_server(base, adapters, args)
    try:
        run_clients(url, [("a0", t) for t in texts[: args.clients]], args.clients, args.max_tokens)  # warm-up
        for k in ks:
            jobs = [(f"a{i % k}", t) for i, t in enumerate(texts)]
            label = "single" if k == 1 else f"mixed K={k}"
            results[label] = summary(run_clients(url, jobs, args.clients, args.max_tokens))
            if k > 1:  # one adapter at a time: all of a0's requests, then a1's, ...
                parts = [run_clients(url, [j for j in jobs if j[0] == f"a{i}"], args.clients, args.max_tokens)
                         for i in range(k)]
                merged = {"wall": sum(p["wall"] for p in parts), "latencies": [x for p in parts for x in p["latencies"]],
                          "tokens": sum(p["tokens"] for p in parts), "requests": sum(p["requests"] for p in parts)}
                results[f"switch K={k}"] = summary(merged)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if not args.skip_peft:
        for k in [k for k in ks if k > 1][:1] or ks[:1]:
            cmd = [sys.executable, __file__, "--peft-worker", "--base", str(base), "--shape", args.shape,
                   "--adapter-names", ",".join(n for n, _ in adapters[:k]),
                   "--adapter-paths", ",".join(str(p) for _, p in adapters[:k]), "--dtype", args.dtype,
                   "--requests", str(args.requests), "--clients", str(args.clients), "--prompt-len", str(args.prompt_len),
                   "--max-tokens", str(args.max_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not line:
                sys.exit(f"peft worker failed:\n{done.stderr[-3000:]}")
            results[f"peft K={k} (static batches)"] = summary(json.loads(line[-1][7:]))
    print(f"\n{'mode':28} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'tokens':>7}")
    for label, r in results.items():
        print(f"{label:28} {r['req_s']:7.2f} {r['tok_s']:8.1f} {r['p50']:7.2f} {r['p90']:7.2f} {r['p99']:7.2f} {r['tokens']:7d}")
    single = results.get("single")
    for k in ks:
        mixed = results.get(f"mixed K={k}")
        if single and mixed:
            switch = results[f"switch K={k}"]
            print(f"K={k}: mixed / single throughput {mixed['tok_s'] / single['tok_s']:.2f}x; mixed / switch "
                  f"{mixed['tok_s'] / switch['tok_s']:.2f}x")
        peft = results.get(f"peft K={k} (static batches)")
        if peft and mixed:
            print(f"K={k}: lorakit server mixed / PEFT generate throughput {mixed['tok_s'] / peft['tok_s']:.2f}x "
                  "(PEFT without HTTP, forced to max_tokens)")
    k4 = results.get("mixed K=4")
    if single and k4:
        ratio = k4["tok_s"] / single["tok_s"]
        print(f"target: 4 adapters mixed at >= 0.8x single-adapter throughput: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.8 else 'NOT MET'}")


if __name__ == "__main__":
    main()
