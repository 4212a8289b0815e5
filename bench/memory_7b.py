"""Peak memory of 4-bit LoRA fine-tuning of a Llama-2-7B-shaped model: lorakit against PEFT + bitsandbytes.

The claim under test: lorakit fine-tunes a Llama-2-7B-shaped model in 4 bits in under 6 GB (6e9 bytes) of
peak resident memory on a CPU machine (2 cores, 24 GiB RAM, no GPU).

Setup (once per directory; skipped when it already holds a complete checkpoint): a Llama-2-7B-shaped model
with seeded random weights (normal std 0.02, norm weights 1; each tensor seeded by its name) written as bf16
safetensors shards of ~2 GB (~13.5 GB in all) one shard at a time, never building the model in memory: the
tensor names and shapes come from the model built on the meta device. The shard index is written last and
atomically, so an interrupted writer leaves no index and is redone. A word-level tokenizer of exactly
`vocab` entries (<unk>, <s>, </s>, w3...) is saved with it, since lorakit's loader loads one.

Each side then runs in a fresh process (bench/harness.py) WITHOUT the MALLOC_TUNE allocator settings of the
speed benchmarks: those keep freed memory in the process, which is right for timing and wrong for a memory
measurement. Both sides: load the 4-bit base (NF4, double quantization, bf16 compute), LoRA r=16 alpha=2r
dropout 0 on q,k,v,o, gradient checkpointing, AdamW lr 1e-4 (no weight decay, no clipping, constant lr)
over the LoRA weights only, `steps` steps on one seeded batch of 1 x seq-len random token ids (labels = ids).
  lorakit  lorakit.base_model.load_base_model (streams the shards, quantizing each weight as it is read),
           lorakit.lora.wrap, lorakit.train.fit (its own step: chunked loss, checkpointing, the end-of-run
           checkpoint and adapter save included)
  peft     AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map="cpu"),
           peft.prepare_model_for_kbit_training (which casts the non-quantized weights, embeddings and
           lm_head included, to fp32: the standard QLoRA recipe), get_peft_model, a plain loop on
           model(input_ids, labels).loss. It only ever runs in train mode: on CPUs with AVX-512-BF16,
           bitsandbytes repacks a Linear4bit that runs in eval mode under no_grad into an inference layout
           with no backward, after which no gradient flows through it.

Memory is what the OS counts: VmHWM (the kernel's peak RSS) from /proc/self/status, read after loading
(load peak), then reset to the current RSS by writing "5" to /proc/self/clear_refs and read again after
each step and at the end (training peak). Overall peak = the larger of the two. RssAnon / RssFile at the end
show whether file pages (a memory-mapped checkpoint) or anonymous memory hold the rest. Both sides check
that the LoRA A weights of the first and last layers got non-zero gradients on the last step (A's gradient
is zero on step 1, while B is still 0) and that no 4-bit layer was repacked.

    python bench/memory_7b.py --preset small   # hidden 2048, 8 layers (~1.1 GB checkpoint): checks the script, ~1-2 min
    python bench/memory_7b.py                  # the 7B shape: writes ~13.5 GB once (a few min), then both sides;
                                               # takes the whole machine for several minutes
    python bench/memory_7b.py --skip-peft      # lorakit only

Checkpoint directory: --dir, else $LORAKIT_BENCH_DIR (7b) / $LORAKIT_BENCH_DIR-small (small), else
~/.cache/lorakit-bench/llama2-7b-random / llama-small-random.
"""
import argparse, ctypes, json, math, os, re, resource, sys, tempfile, time, zlib
from pathlib import Path

import harness

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESETS = {
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008, vocab=32000, max_pos=4096),
    "small": dict(hidden=2048, layers=8, heads=16, kv_heads=16, inter=5632, vocab=32000, max_pos=4096),
}
DEFAULT_DIRS = {"7b": "llama2-7b-random", "small": "llama-small-random"}
SHARD_BYTES = 2 * 10**9
INDEX = "model.safetensors.index.json"
MARKER = "lorakit-bench.json"  # the shape this directory was written for; only such directories are rewritten
TARGET_BYTES = 6 * 10**9
LR, SEED = 1e-4, 0
# LoRA parameter names: lorakit "...layers.3.self_attn.q_proj.lora_A.default", PEFT adds ".weight".
LORA_RE = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\.([^.]+)(?:\.weight)?$")


# ----------------------------------------------------------------------------- checkpoint (driver)
def default_dir(preset: str) -> Path:
    env = os.environ.get("LORAKIT_BENCH_DIR")
    if env:
        return Path(env if preset == "7b" else f"{env}-{preset}").expanduser()
    return Path("~/.cache/lorakit-bench").expanduser() / DEFAULT_DIRS[preset]


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       intermediate_size=shape["inter"], vocab_size=shape["vocab"],
                       max_position_embeddings=shape["max_pos"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def checkpoint_state(path: Path, shape: dict) -> str:
    """"complete", "absent" (nothing of ours, or an interrupted write: rewrite), or an error message."""
    if not path.exists() or not any(path.iterdir()):
        return "absent"
    marker = path / MARKER
    if not marker.is_file():
        return (f"{path} is not empty and was not written by this benchmark (no {MARKER}); give an empty or "
                "new directory with --dir")
    written_for = json.loads(marker.read_text())
    if written_for != shape:
        return (f"{path} holds a checkpoint of another shape ({written_for}); use --dir for this preset "
                "or delete that directory")
    if not (path / INDEX).is_file():
        return "absent"
    index = json.loads((path / INDEX).read_text())
    shards = set(index["weight_map"].values())
    on_disk = sum((path / s).stat().st_size for s in shards if (path / s).is_file())
    if any(not (path / s).is_file() for s in shards) or on_disk < index["metadata"]["total_size"]:
        return "absent"
    return "complete"


def tensor_for(name: str, shape: tuple):
    import torch

    if "norm" in name:  # RMSNorm weights (input_layernorm, post_attention_layernorm, model.norm)
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # per name: independent of order and sharding
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama-2
    words = specials + [f"w{i}" for i in range(len(specials), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def write_checkpoint(path: Path, shape: dict) -> None:
    """Config, tokenizer, then bf16 shards one at a time, then the index (atomically, last)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps(shape))
    for stale in path.glob("model-*-of-*.safetensors"):  # an interrupted earlier write of ours
        stale.unlink()
    cfg = llama_config(shape)
    cfg.save_pretrained(path)
    save_tokenizer(path, shape["vocab"])
    n_tok = len(AutoTokenizer.from_pretrained(path))
    assert n_tok == shape["vocab"], f"tokenizer has {n_tok} entries, expected {shape['vocab']}"
    with torch.device("meta"):  # names and shapes only; no memory
        specs = [(name, tuple(t.shape)) for name, t in LlamaForCausalLM(cfg).state_dict().items()]
    groups, size = [[]], 0
    for name, shp in specs:
        nbytes = math.prod(shp) * 2  # bf16
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: tensor_for(name, shp) for name, shp in group}
        save_file(tensors, path / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        weight_map.update({name: fname for name, _ in group})
        print(f"  wrote {fname}: {len(group)} tensors, {(path / fname).stat().st_size / 1e9:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = path / (INDEX + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, path / INDEX)
    print(f"checkpoint written in {time.perf_counter() - t0:.0f} s: {len(groups)} shards, {total / 1e9:.2f} GB, "
          f"writer peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


# ----------------------------------------------------------------------------- worker side
def proc_status() -> dict:
    """VmHWM / VmRSS / RssAnon / RssFile / RssShmem of this process, in bytes, as the kernel counts them."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (clear_refs "5", Linux 4.0+); True when it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = proc_status()
    return abs(s["VmHWM"] - s["VmRSS"]) < 16 * 2**20


class GradWatch:
    """Norm of each watched LoRA weight's gradient at every accumulation (first and last layer, A and B)."""

    def __init__(self, model, layers: int):
        self.norms = {}
        for name, p in model.named_parameters():
            m = LORA_RE.search(name) if p.requires_grad else None
            if m and int(m[1]) in (0, layers - 1):
                key = f"{m[1]}.{m[2]}.{m[3]}"
                self.norms[key] = []
                p.register_post_accumulate_grad_hook(lambda q, key=key: self.norms[key].append(q.grad.norm().item()))

    def summary(self) -> dict:
        last = {k: v[-1] if v else 0.0 for k, v in self.norms.items()}
        a_last = {k: n for k, n in last.items() if k.endswith(".A")}
        return dict(a_nonzero_last_step=bool(a_last) and all(n > 0 for n in a_last.values()),
                    a_min_last_step=min(a_last.values(), default=0.0),
                    b_min_step1=min((v[0] for k, v in self.norms.items() if k.endswith(".B") and v), default=0.0),
                    watched=len(self.norms))


def repacked_layers(model) -> int:
    """4-bit layers whose weight bitsandbytes rewrote into its CPU inference layout (no backward through it)."""
    return sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"
               and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lorakit_side(args, ids, meter) -> dict:
    import torch
    from lorakit.base_model import load_base_model
    from lorakit.config import ModelConfig, QuantizationConfig, TrainConfig
    from lorakit.data import DataSummary, Example, PreparedData
    from lorakit.lora import LoraConfig, wrap
    from lorakit.train import fit

    notes = []
    t0 = time.perf_counter()
    loaded = load_base_model(ModelConfig(name_or_path=args.dir, dtype="bfloat16", device="cpu",
                                         quantization=QuantizationConfig(bits=4, type="nf4", double_quant=True,
                                                                         compute_dtype="bfloat16")),
                             log=notes.append)
    meter.loaded(time.perf_counter() - t0)
    notes.append(loaded.describe())
    torch.manual_seed(SEED)  # LoRA A init
    model = wrap(loaded.model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                          target_modules=TARGETS))
    watch = GradWatch(model, args.layers)
    row = ids[0].tolist()
    data = PreparedData(examples=[Example(input_ids=row, labels=row, source="random")],
                        summary=DataSummary(source="random", records_read=1, kept=1), packing=False,
                        max_seq_len=len(row), pad_token_id=loaded.tokenizer.pad_token_id)
    config = TrainConfig(max_steps=args.steps, batch_size=1, grad_accum=1, lr=LR, lr_schedule="constant",
                         weight_decay=0.0, max_grad_norm=None, gradient_checkpointing=True, seed=SEED, log_every=1)

    def on_step(event: str, info: dict) -> None:
        if event == "step":  # the loop's own step time: collation, forward, backward, optimizer step
            meter.step(info["loss"], info["tokens"] / info["tokens_per_s"])

    with tempfile.TemporaryDirectory() as out:
        meter.start_steps()
        fit(model, data, config, out, hooks=[on_step], log=notes.append)
        meter.end_steps()
    return dict(path=f"lorakit.train.fit (TrainConfig: max_steps={args.steps}, batch_size=1, lr={LR}, constant, "
                     f"no clipping, gradient_checkpointing=True, loss_chunk_tokens={config.loss_chunk_tokens}; "
                     "includes its end-of-run checkpoint + adapter save)",
                trainable=trainable(model), grads=watch.summary(), repacked=repacked_layers(model), notes=notes)


def peft_side(args, ids, meter) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, device_map="cpu")
    meter.loaded(time.perf_counter() - t0)
    # No forward before training: an eval-mode no_grad forward would repack the 4-bit weights (see docstring).
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                                                       lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    watch = GradWatch(model, args.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    meter.start_steps()
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step(loss.item(), time.perf_counter() - t)
    meter.end_steps()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()
                     if "embed_tokens" in n or "lm_head" in n})
    return dict(path="plain loop: model(input_ids, labels).loss, backward, AdamW step, zero_grad",
                trainable=trainable(model), grads=watch.summary(), repacked=repacked_layers(model),
                notes=[f"embeddings / lm_head dtype after prepare_model_for_kbit_training: {', '.join(dtypes)}"])


class Meter:
    """Peak RSS of the load phase and of the training phase (VmHWM reset in between), step times and losses."""

    def __init__(self):
        self.out = dict(losses=[], step_s=[], hwm_after_step=[])

    def loaded(self, seconds: float) -> None:
        s = proc_status()
        self.out.update(load_s=seconds, load_peak=s["VmHWM"], after_load=s)
        self.out["reset_ok"] = reset_peak()

    def start_steps(self) -> None:
        self.t0, self.ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def step(self, loss: float, seconds: float) -> None:
        self.out["losses"].append(loss)
        self.out["step_s"].append(seconds)
        self.out["hwm_after_step"].append(proc_status()["VmHWM"])

    def end_steps(self) -> None:
        import torch

        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime + ru.ru_stime - self.ru0.ru_utime - self.ru0.ru_stime
        self.out["busy"] = cpu / ((time.perf_counter() - self.t0) * torch.get_num_threads())


def worker(args):
    t0 = time.perf_counter()
    import torch

    meter = Meter()
    meter.out["import_s"] = time.perf_counter() - t0
    meter.out["after_imports"] = proc_status()
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(SEED))
    side = lorakit_side if args.worker == "lorakit" else peft_side
    out = side(args, ids, meter)
    end = proc_status()
    out.update(meter.out, end=end, train_peak=end["VmHWM"], threads=torch.get_num_threads(),
               jemalloc_loaded="libjemalloc" in open("/proc/self/maps").read())
    # After everything is measured: how much of the final RSS is memory freed but kept by glibc malloc.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_trim"] = proc_status()["VmRSS"]
    except (OSError, AttributeError):  # not glibc
        out["rss_after_trim"] = None
    # Without a working reset, VmHWM at the end is the whole run's peak; the training peak is then unknown.
    out["overall_peak"] = max(out["load_peak"], end["VmHWM"])
    if not out["reset_ok"]:
        out["train_peak"] = None
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver side
def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    flags = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    isa = ",".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags) or "no AVX-512"
    mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return (f"{model} ({isa}), {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM, "
            f"loadavg {os.getloadavg()[0]:.2f}")


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="7b")
    ap.add_argument("--dir", help="checkpoint directory (default: see above)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true", help="run lorakit only")
    ap.add_argument("--worker", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from importlib.metadata import version

    shape = PRESETS[args.preset]
    path = Path(args.dir).expanduser() if args.dir else default_dir(args.preset)
    print(f"machine: {machine()}")
    print("versions: " + "  ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "bitsandbytes", "peft",
                                                                  "safetensors", "lorakit")))
    print("allocator: malloc_tune=False (bench/harness.py's MALLOC_TUNE keeps freed memory in the process, which "
          "suits timing, not a memory measurement); inherited: "
          + "  ".join(f"{v}={os.environ.get(v) or '-'}" for v in ("LD_PRELOAD", *harness.MALLOC_TUNE)))
    params = (2 * shape["vocab"] * shape["hidden"] + shape["hidden"]
              + shape["layers"] * (4 * shape["hidden"] ** 2 + 3 * shape["hidden"] * shape["inter"] + 2 * shape["hidden"]))
    print(f"model: preset {args.preset} {shape}, {params / 1e9:.2f}B parameters, bf16 on disk ({2 * params / 1e9:.2f} GB)")
    state = checkpoint_state(path, shape)
    if state not in ("complete", "absent"):
        sys.exit(f"error: {state}")
    if state == "absent":
        print(f"writing the checkpoint to {path} ...", flush=True)
        write_checkpoint(path, shape)
    else:
        print(f"checkpoint: {path} (complete, reused)")
    print(f"settings (both sides): 4-bit NF4 + double quantization, bf16 compute, LoRA r={args.rank} "
          f"alpha={2 * args.rank} dropout 0 on {','.join(TARGETS)} (fp32 adapters), batch 1 x {args.seq_len} "
          f"random ids (seed {SEED}, labels = ids, the same batch every step), {args.steps} steps, gradient "
          f"checkpointing (non-reentrant), AdamW lr {LR} weight_decay 0, no clipping")

    sides = ["lorakit"] + ([] if args.skip_peft else ["peft"])
    res = {}
    for side in sides:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--dir", str(path),
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--layers", str(shape["layers"]), "--vocab", str(shape["vocab"])]
        print(f"running {side} ...", flush=True)
        res[side] = r = harness.run_worker(cmd, side, malloc_tune=False)
        fallback = any(n.startswith("note: loading through transformers") for n in r["notes"])
        loader = ("transformers' bitsandbytes loading (lorakit's fallback, see the note)" if fallback else
                  "lorakit's streaming loader" if side == "lorakit" else "transformers' bitsandbytes loading")
        print(f"  {side}: loader: {loader}; training: {r['path']}")
        for note in r["notes"]:
            print(f"    | {note}")

    print("\nGB = 1e9 bytes; peaks are VmHWM (kernel-tracked peak RSS, file pages included); s/step from each "
          "side's own step timer (step 1 includes warm-up); cpu% below ~90: another process competed for the cores")
    hdr = (f"{'side':8} {'load s':>7} {'load peak GB':>12} {'train peak GB':>13} {'overall GB':>10} "
           f"{'end anon/file GB':>16} {'s/step':>20} {'cpu%':>4} {'trainable':>11}  losses")
    print(hdr + "\n" + "-" * len(hdr))
    for side, r in res.items():
        steps = " ".join(f"{s:.1f}" for s in r["step_s"])
        print(f"{side:8} {r['load_s']:7.1f} {gb(r['load_peak']):>12} {gb(r['train_peak']):>13} "
              f"{gb(r['overall_peak']):>10} {gb(r['end']['RssAnon']) + '/' + gb(r['end']['RssFile']):>16} "
              f"{steps:>20} {r['busy'] * 100:4.0f} {r['trainable']:11,}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    for side, r in res.items():
        g = r["grads"]
        print(f"{side}: after imports {gb(r['after_imports']['VmRSS'])} GB (file {gb(r['after_imports']['RssFile'])}); "
              f"after loading RSS {gb(r['after_load']['VmRSS'])} GB (anon {gb(r['after_load']['RssAnon'])}, file "
              f"{gb(r['after_load']['RssFile'])}); VmHWM after each step "
              f"{', '.join(gb(x) for x in r['hwm_after_step'])} GB; peak reset {'worked' if r['reset_ok'] else 'FAILED'}; "
              f"at the end RSS {gb(r['end']['VmRSS'])} GB, after malloc_trim(0) {gb(r['rss_after_trim'])} GB; "
              f"{r['threads']} threads; jemalloc {'loaded' if r['jemalloc_loaded'] else 'no'}")
        print(f"{side}: LoRA A grads of layers 0 and {shape['layers'] - 1} ({g['watched']} A/B weights watched) "
              f"non-zero on the last step: {'yes' if g['a_nonzero_last_step'] else 'NO'} (min norm "
              f"{g['a_min_last_step']:.3e}; B min norm on step 1 {g['b_min_step1']:.3e}); repacked 4-bit layers: "
              f"{r['repacked']}")
    if "peft" in res:
        k, p = res["lorakit"], res["peft"]

        def ratio(a, b):
            return "-" if a is None or b is None else f"{a / b:.2f}x"

        print(f"lorakit / PEFT: load peak {ratio(k['load_peak'], p['load_peak'])}, training peak "
              f"{ratio(k['train_peak'], p['train_peak'])}, overall peak {ratio(k['overall_peak'], p['overall_peak'])}, "
              f"load time {ratio(k['load_s'], p['load_s'])}, s/step (mean) "
              f"{ratio(sum(k['step_s']), sum(p['step_s']))}; step-1 loss difference "
              f"{abs(k['losses'][0] - p['losses'][0]):.2e}")
    peak = res["lorakit"]["overall_peak"]
    print(f"target: lorakit overall peak {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB) "
          f"{'<' if peak < TARGET_BYTES else '>='} 6 GB: {'MET' if peak < TARGET_BYTES else 'NOT MET'}"
          + ("" if args.preset == "7b" else f" (preset {args.preset}: the target is for the 7b preset)"))


if __name__ == "__main__":
    main()
