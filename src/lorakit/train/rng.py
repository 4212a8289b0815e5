"""Random-number-generator state as plain JSON, so a resumed run draws the same numbers as an uninterrupted one.

Covered: torch's CPU generator, every CUDA device's generator (when CUDA is available), python's `random`,
and numpy's legacy global generator (when numpy is installed). Torch states are uint8 tensors; they are
stored as base64 text so that nothing here is ever pickled or unpickled (HF Trainer's RNG file was a
pickle and became CVE-2026-1839).
"""

from __future__ import annotations

import base64
import random
import warnings

import torch

from ..errors import CheckpointError


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(bytes(state.cpu().tolist())).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def capture_rng_state() -> dict:
    """The state of every global generator a training step may draw from, as a JSON-able dict."""
    version, internal, gauss_next = random.getstate()
    state: dict = {
        "torch_cpu": _encode(torch.get_rng_state()),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def check_rng_state(state: object, source: str) -> None:
    """Raise CheckpointError if `state` is not what capture_rng_state writes (checked before anything is restored)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: the RNG state is malformed ({why})")

    if not isinstance(state, dict) or not isinstance(state.get("python"), dict):
        raise bad("expected an object with 'torch_cpu' and 'python' entries")
    try:
        for text in [state.get("torch_cpu"), *state.get("torch_cuda", [])]:
            _decode(text)
    except (TypeError, ValueError) as err:
        raise bad(f"a torch generator state is not base64: {err}") from None
    py = state["python"]
    internal = py.get("state")
    if not isinstance(internal, list) or len(internal) != len(random.getstate()[1]) \
            or not all(isinstance(v, int) for v in internal):
        raise bad("python.state must be the list of integers random.getstate() holds")
    numpy_state = state.get("numpy", {"keys": []})
    if not isinstance(numpy_state, dict) or not isinstance(numpy_state.get("keys"), list):
        raise bad("numpy.keys must be a list of integers")


def restore_rng_state(state: dict) -> None:
    """Put every generator back where capture_rng_state found it. Warns for a device kind this machine lacks."""
    torch.set_rng_state(_decode(state["torch_cpu"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = [_decode(text) for text in state.get("torch_cuda", [])]
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(f"the checkpoint has RNG states for {len(cuda)} CUDA device(s) but CUDA is not available; "
                          "GPU random draws will differ from the original run", stacklevel=3)
        else:
            count = torch.cuda.device_count()
            if count != len(cuda):
                warnings.warn(f"the checkpoint has RNG states for {len(cuda)} CUDA device(s), this machine has {count}; "
                              f"restoring the first {min(count, len(cuda))}", stacklevel=3)
            for index, s in enumerate(cuda[:count]):
                torch.cuda.set_rng_state(s, index)
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            warnings.warn("the checkpoint has a numpy RNG state but numpy is not installed; skipping it", stacklevel=3)
        else:
            n = state["numpy"]
            np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
