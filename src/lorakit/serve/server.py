"""What `lorakit serve` runs: load the base and startup adapters into an engine, then uvicorn on the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .adapters import NAME
from .guard import MAX_HEADER_BYTES

log = logging.getLogger("lorakit.serve")


@dataclass
class ServeOptions:
    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    served_model_name: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_loras: int | None = None


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    """--adapter NAME=PATH (repeatable) -> {name: path}, checking names as the HTTP routes do."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise ConfigError(f"--adapter {value!r}: expected NAME=PATH", where="lorakit serve")
        if not NAME.match(name):
            raise ConfigError(f"--adapter {value!r}: the name may use letters, digits, '_' and '-' (64 at most)",
                              where="lorakit serve")
        if name in adapters:
            raise ConfigError(f"--adapter: {name!r} given twice", where="lorakit serve")
        adapters[name] = path
    return adapters


def base_model_name(model: str) -> str:
    """The id clients use for the base: a local directory's name (not its full path), or the hub id."""
    local = Path(model).expanduser()
    return local.resolve().name if local.is_dir() else model


def build(options: ServeOptions, *, log_fn=print):
    """(engine, app): the base model loaded, the engine started, startup adapters loaded."""
    from ..base_model import load_base_model
    from ..config import ModelConfig
    from ..infer.engine import Engine
    from ..lora import load_adapter
    from .app import ServeLimits, create_app

    base_name = options.served_model_name or base_model_name(options.model)
    if base_name in options.adapters:
        raise ConfigError(f"--adapter {base_name!r}: that name is the base model's", where="lorakit serve")
    loaded = load_base_model(ModelConfig(name_or_path=options.model, dtype=options.dtype, device=options.device),
                             log=log_fn)
    log_fn(loaded.describe())
    model, startup = loaded.model, dict(options.adapters)
    if startup:
        first = next(iter(startup))
        model = load_adapter(model, startup.pop(first), first)  # a LoraModel: the engine can add more to it
        log_fn(f"adapter {first} loaded")
    elif options.adapter_dir is not None:
        model = empty_lora_model(model)
    limits = ServeLimits(max_prompt_tokens=options.max_prompt_tokens, max_tokens=options.max_tokens,
                         max_loras=options.max_loras)
    engine = Engine(model, loaded.tokenizer, max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                    max_prompt_tokens=limits.max_prompt_tokens, max_new_tokens=limits.max_tokens)
    engine.start()
    try:
        for name, path in startup.items():
            engine.load_adapter(name, path)
            log_fn(f"adapter {name} loaded")
        app = create_app(engine, loaded.tokenizer, base_name=base_name, adapter_dir=options.adapter_dir,
                         api_key=options.api_key, limits=limits)
    except BaseException:
        engine.close()
        raise
    return engine, app


def uvicorn_config(app, host: str, port: int):
    import uvicorn

    # h11 refuses (400) a head still incomplete past the limit; GuardMiddleware refuses (431) a complete one over it
    return uvicorn.Config(app, host=host, port=port, http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_keep_alive=5, log_level="info", server_header=False)


def run(options: ServeOptions, *, log_fn=print) -> None:
    import uvicorn

    engine, app = build(options, log_fn=log_fn)
    try:
        if options.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
            log_fn(f"warning: listening on {options.host} without --api-key: anyone who can reach it can use it")
        uvicorn.Server(uvicorn_config(app, options.host, options.port)).run()
    finally:
        engine.close()


def empty_lora_model(model):
    """A LoraModel with no adapters around `model`, so adapters can be added at runtime."""
    from ..lora import LoraModel

    return LoraModel(model, None).eval()
