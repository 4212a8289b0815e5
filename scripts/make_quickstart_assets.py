#!/usr/bin/env python
"""Generate the offline assets of `lorakit quickstart` (run once by developers; the output is committed).

    python scripts/make_quickstart_assets.py            # writes src/lorakit/quickstart/assets/

Nothing is downloaded. Everything is generated from a small synthetic "world" defined in this file, with fixed
seeds (SEED below), so a rerun gives the same data files and tokenizer, and a model that is the same up to
CPU floating-point nondeterminism.

What it builds:

1. Data. A synthetic world: animals with a color, a number of legs, a home, a food and a sound, plus small
   numbers. Two kinds of chat conversations (chatml, `messages` format) are generated from it:
   * the PRE-TRAINING corpus (not shipped): generic assistant turns about the world - "What color is the fox?"
     -> "The fox is red.", small arithmetic, counting, "Repeat after me: ...", greetings, "Tell me about the
     owl." and so on. It teaches the tiny base model English-ish answers in the chat format, ending with
     <|im_end|>.
   * the QUICKSTART TASK (shipped as data/train.jsonl, data/val.jsonl, data/demo_prompts.json): turn a
     sentence that describes an animal into a one-line JSON record with a fixed key order, e.g.
       user:      Convert to JSON: The fox is red, has 4 legs and lives in the forest.
       assistant: {"animal": "fox", "color": "red", "legs": 4, "home": "forest"}
     The sentences use random (not "true") combinations, five word orders and four phrasings of the
     instruction. The base model never saw JSON, so it answers in prose; a short LoRA run teaches it the
     format. The demo prompts are held out: not in train or val, with animal/color/home combinations that
     appear in neither.
2. Tokenizer. A byte-level BPE (vocab QS_VOCAB) trained with `tokenizers` on the pre-training corpus only (so the
   task's JSON is spelled with pieces the base model has produced), saved as a transformers PreTrainedTokenizerFast with special tokens <|im_start|>,
   <|im_end|> (eos) and <|pad|> (pad), and a chatml chat template.
3. Base model. A tiny Llama (see MODEL below), randomly initialised and pre-trained here on CPU for
   PRETRAIN_STEPS steps on the pre-training corpus (loss on every non-pad token), saved in fp32 safetensors
   with a generation_config (greedy, eos = <|im_end|>).
4. README.md in the assets folder, with the command, seeds, sizes, timings and the final pre-training loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

SEED = 1234
QS_VOCAB = 1024
MAX_POS = 256
MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=512)
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
N_TRAIN, N_VAL, N_DEMO = 1500, 100, 5

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "lorakit" / "quickstart" / "assets"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]

# ----------------------------------------------------------------------------------------------- the world
ANIMALS = ["fox", "owl", "cat", "dog", "frog", "bear", "wolf", "duck", "goat", "horse", "mouse", "snake",
           "whale", "crab", "bee", "ant", "spider", "lion", "tiger", "zebra", "rabbit", "deer", "seal", "shark",
           "eagle", "crow", "swan", "pig", "cow", "sheep", "camel", "panda", "koala", "otter", "moose", "bat",
           "lizard", "turtle", "parrot", "monkey"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray", "orange", "pink"]
HOMES = ["forest", "sea", "desert", "river", "farm", "jungle", "mountains", "city", "lake", "cave"]
FOODS = ["fish", "grass", "seeds", "berries", "meat", "leaves", "insects", "fruit", "nuts", "honey"]
SOUNDS = ["squeak", "roar", "hoot", "bark", "hiss", "buzz", "moo", "quack", "chirp", "growl"]
LEGS = [0, 2, 4, 6, 8]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def make_world(rng: random.Random) -> dict[str, dict]:
    return {a: dict(color=rng.choice(COLORS), legs=rng.choice(LEGS), home=rng.choice(HOMES),
                    food=rng.choice(FOODS), sound=rng.choice(SOUNDS)) for a in ANIMALS}


def pretrain_turn(rng: random.Random, world: dict) -> tuple[str, str]:
    """One generic (user, assistant) exchange about the world."""
    a = rng.choice(ANIMALS)
    f = world[a]
    k = rng.randrange(18)
    if k == 0:
        return rng.choice([f"What color is the {a}?", f"Which color does the {a} have?"]), f"The {a} is {f['color']}."
    if k == 1:
        return f"How many legs does the {a} have?", f"The {a} has {f['legs']} legs."
    if k == 2:
        return rng.choice([f"Where does the {a} live?", f"Where can I find the {a}?"]), f"The {a} lives in the {f['home']}."
    if k == 3:
        return f"What does the {a} eat?", f"The {a} eats {f['food']}."
    if k == 4:
        return f"What does the {a} say?", f"The {a} says \"{f['sound']}\"."
    if k == 5:
        return (rng.choice([f"Tell me about the {a}.", f"Describe the {a}.", f"What do you know about the {a}?"]),
                f"The {a} is {f['color']} and has {f['legs']} legs. It lives in the {f['home']} and eats {f['food']}.")
    if k == 6:
        x, y = rng.randrange(0, 21), rng.randrange(0, 21)
        return f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    if k == 7:
        x = rng.randrange(0, 21)
        y = rng.randrange(0, x + 1)
        return f"What is {x} minus {y}?", f"{x} minus {y} is {x - y}."
    if k == 8:
        x = rng.randrange(0, 20)
        return f"What comes after {x}?", f"After {x} comes {x + 1}."
    if k == 9:
        x = rng.randrange(0, 21)
        return f"How do you write {x} in words?", f"{x} is written \"{NUM_WORDS[x]}\"."
    if k == 10:
        x = rng.randrange(0, 12)
        y = x + rng.randrange(2, 7)
        return f"Count from {x} to {y}.", ", ".join(str(i) for i in range(x, y + 1)) + "."
    if k == 11:
        b = rng.choice(ANIMALS)
        s = rng.choice([f"the {a} and the {b} are friends.", f"a {rng.choice(COLORS)} {a} sleeps in the {rng.choice(HOMES)}.",
                        f"the {a} likes {rng.choice(FOODS)}."])
        return f"Repeat after me: {s}", s[0].upper() + s[1:]
    if k == 12:
        g = rng.choice(["Hello!", "Hi!", "Good morning!", "Hey there!"])
        return g, rng.choice(["Hello! How can I help you?", "Hi! What would you like to know?"])
    if k == 13:
        b = rng.choice(ANIMALS)
        more = f"The {a} has {f['legs']} legs and the {b} has {world[b]['legs']} legs."
        return f"Which has more legs, the {a} or the {b}?", more
    if k == 14:
        x = rng.randrange(1, 8)
        return f"Show the numbers from {x} to {x + 3} as a set.", "{" + ", ".join(str(i) for i in range(x, x + 4)) + "}"
    if k == 15:
        return rng.choice([f"Is the {a} an animal?", f"What is the {a}?"]), f"The {a} is an animal."
    if k == 16:
        return (rng.choice([f"What is the home of the {a}?", f"Write a label for the {a}."]),
                f"animal: {a}, home: {f['home']}, legs: {f['legs']}")
    return rng.choice(["Thank you!", "Thanks!"]), rng.choice(["You are welcome!", "Happy to help!"])


def pretrain_conversation(rng: random.Random, world: dict) -> list[dict]:
    msgs = []
    for _ in range(rng.choice([1, 1, 2])):
        u, a = pretrain_turn(rng, world)
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


# ------------------------------------------------------------------------------------- the quickstart task
INSTRUCTIONS = ["Convert to JSON: ", "Make a JSON record: ", "As JSON, please: ", "Write this as JSON: "]
TEMPLATES = [
    "The {a} is {c}, has {l} legs and lives in the {h}.",
    "The {a} lives in the {h}. It is {c} and has {l} legs.",
    "A {c} {a} with {l} legs lives in the {h}.",
    "In the {h} lives a {c} {a} that has {l} legs.",
    "The {a} has {l} legs, is {c} and lives in the {h}.",
]


def task_record(a, c, l, h, t, i) -> dict:
    user = INSTRUCTIONS[i] + TEMPLATES[t].format(a=a, c=c, l=l, h=h)
    reply = json.dumps({"animal": a, "color": c, "legs": l, "home": h})
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def make_task(rng: random.Random):
    # Demo prompts first: their (animal, color, home) triples are excluded from train and val entirely.
    demo_keys, demo = set(), []
    while len(demo) < N_DEMO:
        a, c, h = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(HOMES)
        if (a, c, h) in demo_keys:
            continue
        demo_keys.add((a, c, h))
        rec = task_record(a, c, rng.choice(LEGS), h, len(demo) % len(TEMPLATES), len(demo) % len(INSTRUCTIONS))
        demo.append({"prompt": rec["messages"][0]["content"], "expected": rec["messages"][1]["content"]})
    seen, rows = set(), []
    while len(rows) < N_TRAIN + N_VAL:
        a, c, l, h = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(LEGS), rng.choice(HOMES)
        t, i = rng.randrange(len(TEMPLATES)), rng.randrange(len(INSTRUCTIONS))
        if (a, c, h) in demo_keys or (a, c, l, h, t, i) in seen:
            continue
        seen.add((a, c, l, h, t, i))
        rows.append(task_record(a, c, l, h, t, i))
    return rows[:N_TRAIN], rows[N_TRAIN:], demo


# ---------------------------------------------------------------------------------------------- tokenizer
def render(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QS_VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   model_max_length=MAX_POS, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------------------------------- pre-training
def pretrain(tokenizer, world, rng: random.Random, steps: int, log) -> tuple[torch.nn.Module, float, float]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|pad|>")
    cfg = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                      **MODEL)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=eos,
                                               pad_token_id=pad, bos_token_id=None)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.98), weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    t0, ema = time.time(), None
    for step in range(steps):
        texts = [render(pretrain_conversation(rng, world)) for _ in range(PRETRAIN_BATCH)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {out.loss.item():.4f}  ema {ema:.4f}  {time.time() - t0:6.1f}s")
    model.eval()
    return model, ema, time.time() - t0


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    rng = random.Random(SEED)
    world = make_world(rng)
    train, val, demo = make_task(random.Random(SEED + 1))
    corpus_rng = random.Random(SEED + 2)
    tok_texts = [render(pretrain_conversation(corpus_rng, world)) for _ in range(20000)]
    # Only the pre-training corpus: the task's JSON is then spelled with tokens the base model has produced
    # ({ " : , words), not with merges it never saw, which LoRA on the attention layers learns much faster.
    tokenizer = build_tokenizer(tok_texts)
    lens = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
            for r in train + val]
    log(f"tokenizer: vocab {len(tokenizer)}; task records are {min(lens)}-{max(lens)} tokens")

    model, final_loss, t_pre = pretrain(tokenizer, world, random.Random(SEED + 3), args.steps, log)

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for name, rows in [("train", train), ("val", val)]:
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    (out / "data" / "demo_prompts.json").write_text(json.dumps(demo, indent=2) + "\n")

    samples = [f"What color is the {ANIMALS[0]}?", "What is 7 plus 5?", f"Tell me about the {ANIMALS[1]}."]
    samples += [d["prompt"] for d in demo[:2]]
    log("base model, greedy:")
    gens = []
    for p in samples:
        g = greedy(model, tokenizer, p)
        gens.append((p, g))
        log(f"  {p!r} -> {g!r}")

    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    total = time.time() - t_start
    n_params = sum(p.numel() for p in model.parameters())
    readme = [
        "# lorakit quickstart assets",
        "",
        "Generated, not downloaded, by the project's own script (deterministic, seeded):",
        "",
        "```bash",
        f"python scripts/make_quickstart_assets.py   # --steps {args.steps} --threads {args.threads}",
        "```",
        "",
        f"- Seeds: world/tokenizer/data SEED={SEED} (+1 task data, +2 tokenizer corpus, +3 pre-training "
        "stream), torch.manual_seed(SEED) for the model init.",
        f"- `model/`: a tiny Llama ({n_params:,} parameters, fp32 safetensors): hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, intermediate "
        f"{MODEL['intermediate_size']}, vocab {len(tokenizer)}, max_position_embeddings {MAX_POS}. Pre-trained "
        f"from scratch on CPU for {args.steps} steps x {PRETRAIN_BATCH} synthetic chatml conversations about a "
        f"small generated world (animals' colors, legs, homes, food, sounds, `key: value` labels; small "
        f"arithmetic; counting; repeating), lr {PRETRAIN_LR} AdamW, cosine; final loss (EMA) {final_loss:.3f}; {t_pre:.0f} s on "
        f"{args.threads} CPU threads.",
        f"- Tokenizer: byte-level BPE (vocab {QS_VOCAB}) trained with `tokenizers` on the pre-training "
        "corpus only (the task's JSON uses pieces the base model has seen); special tokens `<|im_start|>`, `<|im_end|>` (eos), `<|pad|>` (pad); chatml `chat_template`.",
        f"- `data/train.jsonl` ({len(train)}), `data/val.jsonl` ({len(val)}): the quickstart task, `messages` "
        "format: turn a sentence describing an animal into a one-line JSON record "
        "(`{\"animal\": ..., \"color\": ..., \"legs\": ..., \"home\": ...}`). The base model never saw JSON; it "
        f"answers in prose. Records are {min(lens)}-{max(lens)} tokens with the chat template.",
        f"- `data/demo_prompts.json`: {len(demo)} held-out prompts with the expected reply; none is in train or "
        "val, and their (animal, color, home) triples appear in neither.",
        f"- Total generation time: {total:.0f} s.",
        "",
        "Sizes (bytes):",
        "",
        *[f"- `{k}`: {v:,}" for k, v in sizes.items()],
        f"- total: {sum(sizes.values()):,}",
        "",
        "Base model, greedy, at generation time:",
        "",
        *[f"- `{p}` -> `{g}`" for p, g in gens],
        "",
    ]
    (out / "README.md").write_text("\n".join(readme))
    log(f"wrote {out} ({sum(sizes.values()) / 1e6:.2f} MB) in {total:.0f} s")


if __name__ == "__main__":
    main()
