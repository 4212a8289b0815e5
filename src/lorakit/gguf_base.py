"""A GGUF file as the base model: the model a person already runs in llama.cpp or Ollama, trained on as it is.

`model.name_or_path: ./model.Q4_1.gguf` (or a hub repo or directory plus `model.gguf_file`): the file's header is
read for what it holds (architecture, quantization types, parameters), its sha256 identifies it, and its weights
are dequantized once, by transformers' GGUF loading (the gguf package underneath), into a Hugging Face directory
in lorakit's cache, at the dtype the run computes in. Every loading path (plain, 4/8-bit, fsdp shards, merge,
export, serve) then reads that directory as it reads any other; the tokenizer and config are transformers' reading
of the same file. The file's path and sha256 travel with the model (`provenance`) and are saved beside each
adapter trained on it (lora/io.py's BASE_FILE), so later commands can tell whether they apply it to the same file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .user_cache import user_cache

SUFFIX = ".gguf"
_SOURCE_FILE = "gguf_source.json"  # in a dequantized directory: which file, which dtype; written last
_HASH_INDEX = "sha256-index.json"  # in cache_root(): path|inode|size|mtime|ctime -> sha256


def is_gguf(name_or_path: str, gguf_file: str | None = None) -> bool:
    return gguf_file is not None or str(name_or_path).lower().endswith(SUFFIX)


def cache_root() -> Path:
    """Where dequantized GGUF bases are kept: $LORAKIT_CACHE/gguf, else ~/.cache/lorakit/gguf ($XDG_CACHE_HOME)."""
    return user_cache("gguf")


@dataclass(frozen=True)
class GgufFile:
    """What one GGUF file holds, read from its header (no tensor data)."""

    path: Path
    sha256: str
    architecture: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> how many tensors
    parameters: int = 0
    name: str | None = None

    def describe(self) -> str:
        types = ", ".join(f"{n} x {t}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        return (f"GGUF {self.path}: {self.name or 'unnamed'}, architecture {self.architecture}, "
                f"{_count(self.parameters)} parameters in {sum(self.tensor_types.values())} tensors ({types}); "
                f"{human_bytes(self.path.stat().st_size)} on disk, sha256 {self.sha256[:16]}...")

    def provenance(self) -> dict[str, Any]:
        """What BASE_FILE records: enough to recognise the file again."""
        return {"format": "gguf", "path": str(self.path), "sha256": self.sha256, "bytes": self.path.stat().st_size,
                "architecture": self.architecture, "tensor_types": self.tensor_types}


def locate(name_or_path: str, gguf_file: str | None = None, *, revision: str | None = None) -> Path:
    """The local path of the GGUF file: a file path, a directory plus gguf_file, or a hub repo plus gguf_file
    (downloaded into the hub cache)."""
    if gguf_file is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: {name_or_path!r} does not exist (a .gguf path must name a file); "
                              "check the path", where="run config")
        return path.resolve()
    if str(name_or_path).lower().endswith(SUFFIX):
        raise ConfigError(f"model.gguf_file is set, so model.name_or_path must be the directory or hub repo that "
                          f"holds it, not the file {name_or_path!r}; leave gguf_file out to load that file",
                          where="run config")
    directory = Path(name_or_path).expanduser()
    if directory.is_dir():
        path = directory / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in directory.glob(f"*{SUFFIX}"))
            raise ConfigError(f"model.gguf_file: {gguf_file!r} is not in {directory}"
                              + (f"; it has {', '.join(found)}" if found else "; it has no .gguf files"),
                              where="run config")
        return path.resolve()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    except Exception as err:  # the hub's errors (offline, missing repo or file) are many classes
        raise ConfigError(f"model.gguf_file: cannot fetch {gguf_file!r} from {name_or_path!r}: {err}",
                          where="run config") from None


def read_gguf(path: Path) -> GgufFile:
    """The header facts of `path`; a file that is not GGUF, or an architecture transformers cannot read from
    GGUF, is refused by name."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError, struct errors, mmap errors... on a damaged file
        raise ConfigError(f"model.name_or_path: {path} is not a readable GGUF file ({err}); give a .gguf model file "
                          "as llama.cpp writes it", where="run config") from None
    architecture = _text_field(reader, "general.architecture")
    if architecture is None:
        raise ConfigError(f"model.name_or_path: {path} has no general.architecture; it is not a model GGUF",
                          where="run config")
    readable = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES} | set(GGUF_SUPPORTED_ARCHITECTURES)
    if architecture not in readable and architecture.replace("-", "").replace("_", "") not in readable:
        raise ConfigError(
            f"model.name_or_path: {path} holds a {architecture!r} model, which transformers cannot read from GGUF "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); train on the model's Hugging Face "
            "checkpoint instead", where="run config")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return GgufFile(path=path, sha256=_sha256(path), architecture=architecture, tensor_types=dict(types),
                    parameters=parameters, name=_text_field(reader, "general.name"))


def dequantized(source: GgufFile, dtype: torch.dtype, *, log=lambda _: None) -> Path:
    """A Hugging Face directory (config, tokenizer, safetensors) holding `source`'s weights dequantized and cast
    to `dtype`: made once per (file content, dtype) in cache_root(), atomically, then reused."""
    from .atomic import atomic_directory

    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / f"{source.sha256[:24]}-{dtype_name}"
    size = human_bytes(source.parameters * torch.tensor([], dtype=dtype).element_size())
    if _complete(target, source.sha256):
        log(f"{source.describe()}\n  dequantized weights ({dtype_name}, {size} in memory) reused from {target}")
        return target
    log(f"{source.describe()}\n  dequantizing to {dtype_name} ({size} in memory and on disk) into {target} "
        "(once per file and dtype)...")
    model, tokenizer = _load_dequantized(source.path, dtype)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _SOURCE_FILE).write_text(json.dumps({**source.provenance(), "dtype": dtype_name}, indent=2) + "\n",
                                            encoding="utf-8")
    return target


def hf_config_of(path: str | Path):
    """transformers' config of a GGUF file (read from its header), with `architectures` filled in as a
    config.json has it (transformers' GGUF reader leaves it empty). Raises what transformers raises."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(config, "architectures", None) and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def _load_dequantized(path: Path, dtype: torch.dtype):
    """transformers' reading of the file with every weight unpacked (GgufConfig(dequantize=True)); the model is
    then a plain one, and is saved as one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, NotImplementedError, KeyError) as err:
        raise ConfigError(f"model.name_or_path: transformers cannot load {path}: {err}", where="run config") from None
    # Every weight is a plain tensor now; what is left of the GGUF loading only marks the model unsaveable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(path)
    return model, tokenizer


def _complete(target: Path, sha256: str) -> bool:
    try:
        recorded = json.loads((target / _SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded.get("sha256") == sha256 and (target / "config.json").is_file()


def _sha256(path: Path) -> str:
    """The file's sha256, read from the cache's index when the file is unchanged since it was hashed (same
    inode, size, modification and change times: what a rewrite changes), else hashed and indexed; a multi-GB
    file is then read once, not by every command."""
    from .atomic import write_text_atomic

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    index_file = cache_root() / _HASH_INDEX
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if isinstance(index.get(key), str):
        return index[key]
    digest = _hash_contents(path)
    index = {k: v for k, v in index.items() if not k.startswith(f"{path.resolve()}|")}  # older versions of it
    index[key] = digest
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(index_file, json.dumps(index, indent=1) + "\n")
    except OSError:  # a read-only cache only costs the next command a second hashing
        pass
    return digest


def _hash_contents(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _text_field(reader, key: str) -> str | None:
    field_ = reader.fields.get(key)
    if field_ is None or not field_.data:
        return None
    return bytes(field_.parts[field_.data[0]]).decode("utf-8", errors="replace")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def human_bytes(n: int) -> str:
    return next(f"{n / 2**p:.1f} {u}" for p, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if n >= 2**p or p == 0)
