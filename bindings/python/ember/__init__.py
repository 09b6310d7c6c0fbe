"""Ember for Python: run language models on any GPU through ``libember``'s C ABI.

A pure-Python (ctypes) package; it needs the Ember shared library at run time, found in
this order: ``$EMBER_LIBRARY``, a copy bundled in ``ember/_lib/``,
``ctypes.util.find_library("ember")``, and ``target/release`` of the repository when used
from a checkout. ``import ember`` works without it; the first call that needs it raises
:class:`EmberError` if it is missing.

Example::

    import ember

    with ember.Context() as ctx, ember.Model(ctx, "SmolLM2-135M-Instruct.Q4_1.gguf") as model:
        with ember.Session(model) as s:
            for piece in s.stream("The capital of France is", max_tokens=32):
                print(piece, end="", flush=True)

Objects: :class:`Context` (a GPU device) -> :class:`Model` (weights and tokenizer,
thread-safe) -> :class:`Session` (a key/value cache, one thread at a time) with its
:class:`Sequence` objects; :class:`Adapter` for LoRA adapters; :class:`Trainer` (with
:class:`TrainParams`) teaches a model a LoRA adapter, soft prompt or prefix on its GPU. Every
handle is a context manager and frees itself on ``close()`` (idempotent) or garbage
collection.
"""

from __future__ import annotations

from ._core import (
    Adapter,
    Context,
    Generation,
    Learner,
    Model,
    ModelInfo,
    Sequence,
    Session,
    StepResult,
    Stream,
    Trainer,
    TrainParams,
    abi_version,
    set_log_callback,
    status_str,
    version,
)
from ._ffi import (
    ABI_VERSION,
    EmberError,
    LogLevel,
    LrSchedule,
    SamplerParams,
    Status,
    StopReason,
    find_library,
    lib_path,
)

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "Adapter",
    "Context",
    "EmberError",
    "Generation",
    "Learner",
    "LogLevel",
    "LrSchedule",
    "Model",
    "ModelInfo",
    "SamplerParams",
    "Sequence",
    "Session",
    "Status",
    "StepResult",
    "StopReason",
    "Stream",
    "TrainParams",
    "Trainer",
    "abi_version",
    "find_library",
    "lib_path",
    "set_log_callback",
    "status_str",
    "version",
]
