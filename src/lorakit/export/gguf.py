"""GGUF files for llama.cpp (and so Ollama) from a merged Hugging Face model directory.

Written with the `gguf` package, which the llama.cpp project maintains: its tensor-name map turns
`model.layers.3.self_attn.q_proj.weight` into `blk.3.attn_q.weight`, its writer lays out the file, its
quantizer makes q8_0 blocks. What lorakit decides is what llama.cpp expects of each architecture:

- llama, mistral (llama.cpp's "llama"): llama.cpp rotates query/key pairs that are adjacent, transformers
  rotates the two halves of each head, so q_proj and k_proj rows are reordered per head to match.
- qwen2 ("qwen2"): rotates halves like transformers; q, k, v carry biases.
- qwen3 ("qwen3"): rotates halves; no biases, an RMSNorm on each head's query and key (attn_q_norm, attn_k_norm)
  and a head size of its own (head_dim, not hidden / heads).
- gemma2 ("gemma2"), gemma3 text ("gemma3"): rotate halves; every RMSNorm multiplies by (1 + weight), and
  llama.cpp's by weight, so 1 is added to each norm weight; llama.cpp scales the embeddings by sqrt(hidden)
  itself, ties the output head to them and fixes some choices by architecture, which are checked against
  the config rather than assumed: the attention scale (1/sqrt(head_dim), 1/sqrt(hidden/heads) at the 27B
  layer counts), the sliding-window layer pattern (every other layer for gemma2, five in six for gemma3),
  gemma3's local rope base (10000) and its lack of soft-capping; gemma2's soft-caps are written.
- phi3 ("phi3"): rotates halves (over head_dim * partial_rotary_factor); q, k, v and gate, up are fused
  tensors (attn_qkv, ffn_up) in both, so they and their LoRA pass through as they are.
- the tokenizer: byte-level BPE as "gpt2", with merges, special tokens and the chat template, for the
  pre-tokenizers of GPT-2, Llama 3 and Qwen2 (recognised by their exact split pattern); SentencePiece-style
  BPE (byte fallback, the ▁ word marker: Llama 2, Mistral, Gemma) as "llama", scored by merge rank, with
  whether the tokenizer puts ▁ before the text (Llama 2 does, Gemma does not). Others are refused by name,
  not converted approximately.

The file is written atomically (lorakit.atomic: a temporary file beside the target, fsynced, renamed).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import ExportError
from .outputs import check_out
from .quantize import LLAMA_QUANTS, llama_quantize

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                 "Phi3ForCausalLM": "phi3"}
# llama.cpp's model type by layer count where it changes the Gemma attention scale (src/llama-model.cpp:
# f_attention_scale is 1/sqrt(hidden/heads) for LLM_TYPE_27B, else 1/sqrt(head_dim)).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's sliding-window layer pattern (set_swa_pattern(n): layer i slides unless i % n == n - 1).
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
ENCODED = ("f16", "q8_0", "f32")  # written here with the gguf package
QUANTS = ("f16", "q8_0", *LLAMA_QUANTS)  # what --quant offers; the rest through llama.cpp's quantizer


def write_gguf(model_dir: str | Path, out_file: str | Path, *, quant: str = "f16", name: str | None = None,
               overwrite: bool = False) -> Path:
    """Convert the transformers model directory `model_dir` (a merged export) into one GGUF file; `overwrite`
    replaces an existing GGUF file, and nothing else (export/outputs.py). k-quants and q4_0 are made by
    llama.cpp's quantizer from an f32 file written first (export/quantize.py)."""
    model_dir, out = Path(model_dir), Path(out_file)
    check_out(out, "gguf", overwrite=overwrite)
    if quant not in QUANTS and quant != "f32":
        raise ExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if quant in LLAMA_QUANTS:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f".{out.name}.f32-", dir=out.parent) as work:
            full = write_gguf(model_dir, Path(work) / "f32.gguf", quant="f32", name=name)
            with atomic_path(out) as staging:
                llama_quantize(full, staging, quant)
                check_out(out, "gguf", overwrite=overwrite)  # just before the replace
        return out
    gguf = gguf_module()
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; {model_dir} is {architecture}. "
                          "Export with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = ARCHITECTURES[architecture]
    rope_theta, rope_type, rope_factor = rope_settings(config)
    if rope_type not in ("default", "linear"):
        raise ExportError(f"rope scaling {rope_type!r} is not supported by lorakit's GGUF export yet (default and "
                          "linear are)")
    check_architecture(config, arch)

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(model_arch(gguf, arch), layers)

    with gguf_file(out, gguf.MODEL_ARCH_NAMES[model_arch(gguf, arch)], overwrite=overwrite) as writer:
        writer.add_name(name or model_dir.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_rope_freq_base(rope_theta)
        partial = config.get("partial_rotary_factor") or (config.get("rope_parameters") or {}).get("partial_rotary_factor")
        writer.add_rope_dimension_count(int(head_dim * (partial or 1.0)))  # Phi-3.5/4-mini rotate part of each head
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_factor)
        if arch in ("gemma2", "gemma3", "phi3") and config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "f32": gguf.LlamaFileType.ALL_F32}[quant])
        _add_tokenizer(writer, model_dir, config.get("vocab_size"))

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{model_dir} has no .safetensors weights; export it with --format hf first")
        seen = set()
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or (arch in GEMMA_27B_LAYERS and key == "lm_head.weight"):
                        continue  # gemma: the head is the embedding (checked tied above)
                    target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if target is None:
                        raise ExportError(f"{file.name}: tensor {key!r} has no GGUF name for {arch}; "
                                          "is this a plain (merged) transformers checkpoint?")
                    tensor = f.get_tensor(key).float()
                    if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
                        tensor = interleave_rope(tensor, heads if "q_proj" in key else kv_heads)
                    if arch in GEMMA_27B_LAYERS and key.endswith("norm.weight"):
                        tensor = tensor + 1  # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by weight
                    data, kind = _encode(tensor, quant, gguf)
                    writer.add_tensor(target, data, raw_dtype=kind)
                    seen.add(target)
        if "token_embd.weight" not in seen:
            raise ExportError(f"{model_dir} has no token embedding tensor; is it a complete checkpoint?")
        # A tied head is saved once (as the embedding): llama.cpp then uses token_embd.weight as the output.
    return out


def gguf_module():
    """The gguf package, or an ExportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package (maintained by llama.cpp): "
                          "pip install 'lorakit[export]'") from None
    return gguf


@contextlib.contextmanager
def gguf_file(out: Path, arch_name: str, *, overwrite: bool = False):
    """A GGUFWriter whose file replaces `out` atomically when the block succeeds (lorakit.atomic); an existing
    `out` only with `overwrite`, and only if it is a GGUF file."""
    gguf = gguf_module()
    with atomic_path(out) as staging:
        writer = gguf.GGUFWriter(staging, arch_name)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_out(out, "gguf", overwrite=overwrite)  # just before the replace


def model_arch(gguf, arch: str):
    """The gguf package's MODEL_ARCH for an ARCHITECTURES value."""
    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
            "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}[arch]


def rope_settings(config: dict, layer_type: str = "full_attention") -> tuple[float, str, float]:
    """(base frequency, scaling type, factor) of the rotary embedding, from transformers' rope_parameters (flat, or
    one entry per layer type as Gemma 3 has it) or the older rope_theta + rope_scaling."""
    params = config.get("rope_parameters") or {}
    if layer_type in params:
        params = params[layer_type]
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), kind, float(scaling.get("factor") or 1.0)


def check_architecture(config: dict, arch: str) -> None:
    """Refuse, by name, a config whose model llama.cpp would compute differently: the choices its graph for `arch`
    fixes rather than reads from the file."""
    problems = []
    heads, hidden, layers = config["num_attention_heads"], config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    if arch in GEMMA_27B_LAYERS:
        if not config.get("tie_word_embeddings", True):
            problems.append("an output head apart from the embeddings (llama.cpp ties them for Gemma)")
        scale_dim = hidden // heads if layers == GEMMA_27B_LAYERS[arch] else head_dim
        if config.get("query_pre_attn_scalar", head_dim) != scale_dim:
            problems.append(f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} (llama.cpp scales "
                            f"attention by 1/sqrt({scale_dim}) for a {layers}-layer {arch})")
        pattern = GEMMA_SWA_PATTERN[arch]
        expected = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(layers)]
        if config.get("layer_types") not in (None, expected):
            problems.append(f"layer_types other than llama.cpp's (one full-attention layer in {pattern})")
        if config.get("hidden_activation", config.get("hidden_act")) not in ("gelu_pytorch_tanh", None):
            problems.append(f"activation {config.get('hidden_activation', config.get('hidden_act'))!r} (llama.cpp: "
                            "gelu_pytorch_tanh)")
    if arch == "gemma2" and not (config.get("attn_logit_softcapping") and config.get("final_logit_softcapping")):
        problems.append("no attention or final soft-capping (llama.cpp's gemma2 always caps)")
    if arch == "gemma3":
        if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
            problems.append("soft-capping (llama.cpp's gemma3 has none)")
        local_theta, local_type, _ = rope_settings(config, "sliding_attention")
        local_theta = config.get("rope_local_base_freq", local_theta)
        if local_theta != 10000.0 or local_type != "default":
            problems.append(f"a sliding-layer rope base of {local_theta:g} ({local_type}; llama.cpp: 10000, unscaled)")
    if arch == "phi3" and config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config.get('hidden_act')!r} (llama.cpp: silu)")
    if problems:
        raise ExportError(f"GGUF export of this {arch} model: llama.cpp would compute it differently: "
                          f"{'; '.join(problems)}. Export with --format hf instead")


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered per head from transformers' halves (0..d/2-1 | d/2..d-1) to
    llama.cpp's adjacent pairs (0, d/2, 1, d/2+1, ...), so both rotate the same coordinates together."""
    out_features = weight.shape[0]
    return (weight.reshape(heads, 2, out_features // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _encode(tensor: torch.Tensor, quant: str, gguf):
    """(numpy data, GGML type): 1-D tensors (norms, biases) in f32 as llama.cpp keeps them; matrices in f16,
    or q8_0 where the row length is a multiple of q8_0's 32-value block (else f16), or f32 (the source of
    llama.cpp's quantizer)."""
    array = tensor.numpy()
    if tensor.dim() == 1 or quant == "f32":
        return array.astype("float32", copy=False), gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and tensor.shape[-1] % 32 == 0:  # the tensor is float32 already: no second copy
        return (gguf.quantize(array.astype("float32", copy=False), gguf.GGMLQuantizationType.Q8_0),
                gguf.GGMLQuantizationType.Q8_0)
    return array.astype("float16"), gguf.GGMLQuantizationType.F16


# The split patterns of byte-level BPE tokenizers, as their tokenizer.json files hold them, and the name of
# the matching pre-tokenizer in llama.cpp. Recognised by exact text: a tokenizer that differs is refused.
SPLIT_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _pre_tokenizer_name(pre: dict) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.json's "pre_tokenizer"), or None if unknown."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)):
        return None
    pattern = (split.get("pattern") or {}).get("Regex")
    return next((name for name, known in SPLIT_PATTERNS.items() if pattern == known), None)


def _add_tokenizer(writer, model_dir: Path, vocab_size: int | None) -> None:
    """Vocabulary, token types (and scores), merges, special token ids and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    spec_file = model_dir / "tokenizer.json"
    if not spec_file.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json (a fast tokenizer); GGUF export needs it")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    pre_name = None if sentencepiece else _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if not sentencepiece and (model.get("type") != "BPE" or pre_name is None):
        raise ExportError("GGUF export supports SentencePiece-style BPE tokenizers (Llama 2, Mistral) and byte-level "
                          f"BPE tokenizers that split text like GPT-2, Llama 3 or Qwen2; this one is {model.get('type')} "
                          "with pre-tokenizer "
                          f"{(spec.get('pre_tokenizer') or {}).get('type')}. Export with --format hf and convert with "
                          "llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = _vocabulary(tokenizer, max(vocab_size or 0, len(tokenizer)), sentencepiece=sentencepiece)
    if sentencepiece:
        # llama.cpp merges the adjacent pair whose joined piece scores highest: each piece scores minus the
        # rank of the merge that makes it, the same order as the tokenizer's merges.
        rank: dict[str, int] = {}
        for i, merge in enumerate(model.get("merges") or []):
            left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
            rank.setdefault(left + right, i)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # Llama 2 / Mistral put ▁ before the text, Gemma does not; llama.cpp assumes it does unless told
        writer.add_add_space_prefix(_prepends_word_marker(spec))
        writer.add_token_scores([-1e9 if kind == gguf.TokenType.UNUSED else -float(rank[piece]) if piece in rank
                                 else 0.0 for piece, kind in zip(tokens, types)])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=not sentencepiece, n_vocab=len(tokens)).add_to_gguf(writer)


def _prepends_word_marker(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts ▁ before the text: a Prepend normalizer (older converted
    tokenizers) or a Metaspace pre-tokenizer that prepends (newer ones); Gemma's only replaces spaces."""
    def steps(part: dict | None, key: str) -> list[dict]:
        part = part or {}
        return (part.get(key) or []) if part.get("type") == "Sequence" else [part]
    normalizers = steps(spec.get("normalizer"), "normalizers")
    pre_tokenizers = steps(spec.get("pre_tokenizer"), "pretokenizers")
    return (any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in normalizers)
            or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always" if p.get("add_prefix_space", True)
                                                           else "never") != "never" for p in pre_tokenizers))


def _vocabulary(tokenizer, size: int, *, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Pieces and llama.cpp token types for ids 0..size-1 (ids past the tokenizer's are unused padding).
    Special added tokens are CONTROL, other added ones USER_DEFINED; a SentencePiece vocabulary also marks
    its byte pieces (<0xNN>) BYTE and its unknown piece UNKNOWN."""
    import gguf

    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    tokens, types = [], []
    known = len(tokenizer)  # once: older tokenizers versions copy the whole vocabulary on every len()
    for i in range(size):
        if i >= known:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        tokens.append(piece)
        if i in special:
            unknown = sentencepiece and piece == tokenizer.unk_token
            types.append(gguf.TokenType.UNKNOWN if unknown else gguf.TokenType.CONTROL)
        elif sentencepiece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types
