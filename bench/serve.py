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

Reported: requests/s, generated tokens/s, latency p50/p90/p99 per request, 429 retries, the server process's
share of the machine's CPUs over the measurement (cpu%: the client threads take the rest), and mixed/single and
mixed/switch throughput ratios (target: with 4 adapters mixed, at least 0.9x the single-adapter throughput).
Each comparison runs --rounds times, its modes interleaved, so a drift in the machine's speed hits all alike.

Two more measurements (issue 21), each against its baseline in the same run, interleaved:
  lru      --lru-adapters (32) adapters in --adapter-dir served through --max-loras (8): each request names one
           of the 32 at random (seeded), so adapters are loaded on first use and the least recently used evicted;
           against 8 adapters loaded at startup under the same kind of random mix. Requests that find every slot
           busy get 429 and retry after 50 ms (counted).
  json     constrained decoding on a real model and tokenizer (SmolLM2-135M-Instruct from its GGUF, 49152-token
           vocabulary): chat completions with response_format json_schema against the same requests without it;
           generated tokens/s of each (target: constrained within 10% of unconstrained).

    python bench/serve.py                     # K = 1, 4, 16; lru; json; N = 8 clients; ~15 min on 2 cores
    python bench/serve.py --quick             # tiny model, K = 1, 4, fewer requests: a smoke test
    python bench/serve.py --only lru,json     # some of the measurements (mixed, lru, json)
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


def start_server(base: Path, adapters, args, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--port", str(port), "--dtype", args.dtype,
           "--max-batch-size", str(args.clients), "--max-tokens", str(args.max_tokens), "--max-queue", "256", *extra]
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


def run_clients(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, *, chat: dict | None = None) \
        -> dict:
    """Send `jobs` (model, prompt) from `clients` threads, greedy; -> wall time, latencies, tokens, 429 retries.
    `chat`: send chat completions (the prompt as the user message) with these extra fields."""
    import httpx
    lock, latencies, tokens, errors, retries = threading.Lock(), [], [0], [], [0]
    queue = list(reversed(jobs))

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    model, prompt = queue.pop()
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
                if chat is None:
                    route, body["prompt"] = "/v1/completions", prompt
                else:
                    route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
                    body.update(chat)
                t0 = time.perf_counter()
                while True:
                    r = http.post(url + route, json=body)
                    if r.status_code != 429:
                        break
                    with lock:
                        retries[0] += 1
                    time.sleep(0.05)
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
    return {"wall": wall, "latencies": latencies, "tokens": tokens[0], "requests": len(latencies), "retries": retries[0]}


def summary(r: dict) -> dict:
    lat = sorted(r["latencies"])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"req_s": r["requests"] / r["wall"], "tok_s": r["tokens"] / r["wall"], "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "requests": r["requests"], "tokens": r["tokens"], "retries": r.get("retries", 0),
            "cpu": r.get("cpu")}


def cpu_share(pid: int):
    """A clock of one process's CPU time (the server's, from /proc): busy = its CPU seconds / (wall x cores)."""
    def read() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    start, t0 = read(), time.perf_counter()
    return lambda: (read() - start) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def measured(proc, url, jobs, args, **kw) -> dict:
    """run_clients, with the server process's share of the machine's CPUs over the run."""
    share = cpu_share(proc.pid)
    r = run_clients(url, jobs, args.clients, args.max_tokens, **kw)
    r["cpu"] = share()
    return r


def server_counts(url: str) -> dict:
    import httpx
    return httpx.get(url + "/metrics").json()["server"]


def run_lru(root: Path, base: Path, adapters, args, results: dict) -> None:
    """--lru-adapters adapters through --max-loras slots, against that many fixed adapters; interleaved rounds."""
    import random
    texts = prompts(args.lru_requests, args.prompt_len, SHAPES[args.shape]["vocab"])
    rng = random.Random(1)
    fixed_jobs = [(f"a{rng.randrange(args.max_loras)}", t) for t in texts]
    lru_jobs = [(f"adapter{rng.randrange(args.lru_adapters)}", t) for t in texts]
    rounds: dict[str, list] = {"fixed": [], "lru": []}
    for _ in range(args.rounds):
        proc, url = start_server(base, adapters[:args.max_loras], args)
        try:
            run_clients(url, fixed_jobs[:args.clients], args.clients, args.max_tokens)  # warm-up
            rounds["fixed"].append(measured(proc, url, fixed_jobs, args))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, url = start_server(base, [], args, "--adapter-dir", str(root), "--max-loras", str(args.max_loras))
        try:
            run_clients(url, [("adapter0", t) for t in texts[:args.clients]], args.clients, args.max_tokens)
            before = server_counts(url)
            r = measured(proc, url, lru_jobs, args)
            after = server_counts(url)
            r["evictions"] = after.get("adapters_evicted", 0) - before.get("adapters_evicted", 0)
            rounds["lru"].append(r)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for key, label in (("fixed", f"fixed {args.max_loras} adapters"),
                       ("lru", f"lru {args.lru_adapters} via {args.max_loras}")):
        results[label] = merge(rounds[key])
    print(f"lru: {statistics.mean(r['evictions'] for r in rounds['lru']):.0f} evictions per round of "
          f"{args.lru_requests} requests", flush=True)


def run_json(args, results: dict) -> None:
    """Constrained decoding on SmolLM2-135M-Instruct: response_format json_schema against no format."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from check_gguf_task import smollm2_gguf

    gguf = smollm2_gguf()
    people = ["a baker in Lyon", "a pilot from Oslo", "a student in Lima", "a nurse in Osaka", "a chef from Rome",
              "a farmer in Kenya", "a painter in Prague", "a teacher in Quito"]
    texts = [f"Describe {p} as a JSON object with a name, an age and a city." for p in people]
    texts = (texts * (args.json_requests // len(texts) + 1))[:args.json_requests]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "city": {"type": "string", "maxLength": 40}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}
    model = "SmolLM2-135M-Instruct.Q4_1.gguf"
    rounds: dict[str, list] = {"free": [], "json": []}
    proc, url = start_server(gguf, [], args, "--served-model-name", model)
    try:
        jobs = [(model, t) for t in texts]
        run_clients(url, jobs[:args.clients], args.clients, args.max_tokens, chat={})  # warm-up
        run_clients(url, jobs[:args.clients], args.clients, args.max_tokens, chat=fmt)
        for _ in range(args.rounds):
            rounds["free"].append(measured(proc, url, jobs, args, chat={}))
            rounds["json"].append(measured(proc, url, jobs, args, chat=fmt))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results["SmolLM2 unconstrained"] = merge(rounds["free"])
    results["SmolLM2 json_schema"] = merge(rounds["json"])


def merge(parts: list[dict], *, raw: bool = False) -> dict:
    """Several runs as one: summed walls and tokens, the CPU share averaged; summarised, or `raw` (to merge again)."""
    out = {"wall": sum(p["wall"] for p in parts), "latencies": [x for p in parts for x in p["latencies"]],
           "tokens": sum(p["tokens"] for p in parts), "requests": sum(p["requests"] for p in parts),
           "retries": sum(p.get("retries", 0) for p in parts),
           "cpu": statistics.mean(p["cpu"] for p in parts) if all(p.get("cpu") is not None for p in parts) else None}
    if raw:
        return out
    cpu = out.pop("cpu")
    return {**summary(out), "cpu": cpu}


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
    ap.add_argument("--only", default="mixed,lru,json", help="which measurements: mixed, lru, json")
    ap.add_argument("--lru-adapters", type=int, default=32)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--lru-requests", type=int, default=64)
    ap.add_argument("--json-requests", type=int, default=16)
    ap.add_argument("--json-max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each comparison")
    ap.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--base", "--adapter-names", "--adapter-paths"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_worker:
        return peft_worker(args)
    if args.quick:
        args.shape, args.adapters, args.requests, args.max_tokens = "tiny", "1,4", 16, 8
        args.lru_adapters, args.max_loras, args.lru_requests, args.json_requests, args.rounds = 8, 2, 16, 8, 1
    only = set(args.only.split(","))
    ks = [int(k) for k in args.adapters.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    base, adapters = build(root, SHAPES[args.shape], max(ks + ([args.lru_adapters] if "lru" in only else [])))
    import torch, transformers
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  cpus {os.cpu_count()}  "
          f"loadavg {os.getloadavg()[0]:.2f}")
    print(f"shape {args.shape} {SHAPES[args.shape]}, {args.dtype}; LoRA r=16 on {','.join(TARGETS)}; {args.requests} "
          f"requests of {args.prompt_len} prompt words, max_tokens {args.max_tokens}, greedy, {args.clients} clients "
          f"(server --max-batch-size {args.clients})")
    texts = prompts(args.requests, args.prompt_len, SHAPES[args.shape]["vocab"])
    results = {}
    if "mixed" in only:
        proc, url = start_server(base, adapters[:max(ks)], args)
        try:
            run_clients(url, [("a0", t) for t in texts[: args.clients]], args.clients, args.max_tokens)  # warm-up
            runs: dict[str, list] = {}
            for _ in range(args.rounds):  # interleaved, so a drift of the machine's speed hits every mode alike
                for k in ks:
                    jobs = [(f"a{i % k}", t) for i, t in enumerate(texts)]
                    runs.setdefault("single" if k == 1 else f"mixed K={k}", []).append(measured(proc, url, jobs, args))
                    if k > 1:  # one adapter at a time: all of a0's requests, then a1's, ...
                        runs.setdefault(f"switch K={k}", []).append(merge(
                            [measured(proc, url, [j for j in jobs if j[0] == f"a{i}"], args) for i in range(k)],
                            raw=True))
            results.update({label: merge(parts) for label, parts in runs.items()})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if "lru" in only:
        run_lru(root, base, adapters, args, results)
    if "json" in only:
        run_json(argparse.Namespace(**{**vars(args), "max_tokens": args.json_max_tokens}), results)
    if not args.skip_peft and "mixed" in only:
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
    print(f"\n{'mode':28} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'tokens':>7} {'429s':>5} "
          f"{'cpu%':>5}")
    for label, r in results.items():
        cpu = f"{r['cpu'] * 100:5.0f}" if r.get("cpu") is not None else "    -"
        print(f"{label:28} {r['req_s']:7.2f} {r['tok_s']:8.1f} {r['p50']:7.2f} {r['p90']:7.2f} {r['p99']:7.2f} "
              f"{r['tokens']:7d} {r['retries']:5d} {cpu}")
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
        print(f"target: 4 adapters mixed at >= 0.9x single-adapter throughput: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.9 else 'NOT MET'}")
    fixed, lru = results.get(f"fixed {args.max_loras} adapters"), results.get(f"lru {args.lru_adapters} via {args.max_loras}")
    if fixed and lru:
        print(f"lru: {args.lru_adapters} adapters through {args.max_loras} slots / {args.max_loras} fixed adapters: "
              f"{lru['tok_s'] / fixed['tok_s']:.2f}x tokens/s, p50 latency {lru['p50'] / fixed['p50']:.2f}x")
    free, held = results.get("SmolLM2 unconstrained"), results.get("SmolLM2 json_schema")
    if free and held:
        ratio = held["tok_s"] / free["tok_s"]
        print(f"target: constrained decoding within 10% of unconstrained tokens/s: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.9 else 'NOT MET'}")


if __name__ == "__main__":
    main()
