"""Causal attention forward + backward on CPU: PyTorch's flash kernel against the same maths written as matmuls.

The profile of a compiled lorakit training step (train_speed.py) leaves PyTorch's CPU flash-attention
backward as the largest cost after the matmuls. This measures whether anything available in plain PyTorch
beats it at a layer's shape: SDPA (flash, the default on CPU), attention written as matmul + softmax + matmul
(eager, and through torch.compile, which fuses the softmax and mask), and FlexAttention where the installed
torch supports its backward on CPU. Also the relative error of each path's gradients against an fp32 SDPA.

    python bench/attention_backward.py                      # the 150m preset's shape: 4 x 12 heads x 512 x 64
    python bench/attention_backward.py --batch 1 --seq 2048
"""
import argparse, math, time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, h, s, d, dtype=torch.bfloat16)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)

    def as_matmuls(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1 / math.sqrt(d))  # (b, h, s, s)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)

    paths = {"sdpa (flash)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "matmuls, eager": as_matmuls, "matmuls, compiled": torch.compile(as_matmuls)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda _b, _h, qi, ki: qi >= ki, None, None, s, s, device="cpu")
        flex = torch.compile(flex_attention)
        paths["flex attention"] = lambda q, k, v: flex(q, k, v, block_mask=mask)
    except ImportError:
        pass

    reference = [x.detach().float().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*reference, is_causal=True).backward(grad_out.float())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 q, k, v of {b} x {h} x {s} x {d}, causal")
    print(f"{'path':20s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}   grad rel. error vs fp32 sdpa (q, k, v)")
    for name, fn in paths.items():
        def forward():
            with torch.no_grad():
                fn(q, k, v)

        def both():
            fn(q, k, v).backward(grad_out)
        try:
            fwd, total = timed(forward, args.reps), timed(both, args.reps)
        except (NotImplementedError, RuntimeError) as err:  # e.g. FlexAttention: no backward on CPU
            print(f"{name:20s} unavailable: {str(err).splitlines()[0][:90]}")
            continue
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(grad_out)
        errors = [float((x.grad.float() - r.grad).norm() / r.grad.norm()) for x, r in zip((q, k, v), reference)]
        print(f"{name:20s} {fwd:8.1f} {total:11.1f}   " + ", ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
