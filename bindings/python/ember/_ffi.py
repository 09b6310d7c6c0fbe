"""Low-level ctypes mirror of ``capi/include/ember.h``.

Every struct of the header is mirrored field by field (same order, same C types); every
function gets its ``argtypes``/``restype``. The shared library is found and loaded lazily by
:func:`lib` (see :func:`find_library` for the search order), so ``import ember`` never fails
for want of the native library: the first call that needs it raises :class:`EmberError`.

This module is internal; the public API lives in :mod:`ember`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import List, Optional

#: The ABI version these bindings were written against (``EMBER_ABI_VERSION``).
ABI_VERSION = 1


# ---------------------------------------------------------------------------------------
# Enums and the error type
# ---------------------------------------------------------------------------------------


class Status(enum.IntEnum):
    """Mirror of ``ember_status``: the result of every fallible C call (stable numbers)."""

    OK = 0
    """Success."""
    INVALID_ARGUMENT = 1
    """A NULL pointer, a value out of range, a wrong ``struct_size``, a freed handle, or
    text that is not UTF-8 (the bindings also use it for a closed Python handle)."""
    IO = 2
    """Reading or writing a file failed (the bindings also use it when the shared library
    cannot be found or loaded)."""
    FORMAT = 3
    """A file is malformed."""
    UNSUPPORTED = 4
    """Well-formed input that Ember does not implement (the bindings also use it for a
    library whose ABI version differs from theirs)."""
    OUT_OF_MEMORY = 5
    """A memory budget or a device limit would be exceeded."""
    DEVICE_LOST = 6
    """No GPU adapter, or the device was lost."""
    ABORTED = 7
    """A callback asked to stop."""
    INTERNAL = 8
    """A bug in Ember (including a caught internal panic)."""
    BUFFER_TOO_SMALL = 9
    """An output buffer is too small (handled inside the bindings; not normally seen)."""


class StopReason(enum.IntEnum):
    """Mirror of ``ember_stop_reason``: why a generation ended."""

    EOS = 0
    """End-of-generation token."""
    LENGTH = 1
    """``max_tokens`` reached."""
    STRING = 2
    """A stop string appeared (it is not included in the text)."""
    CONTEXT = 3
    """The context is full."""
    CALLBACK = 4
    """The callback returned false."""


class LogLevel(enum.IntEnum):
    """Mirror of ``ember_log_level``: the level passed to the log callback."""

    ERROR = 1
    """Errors."""
    WARN = 2
    """Warnings."""
    INFO = 3
    """Information (device chosen, model loaded)."""
    DEBUG = 4
    """Debugging detail."""


class LrSchedule(enum.IntEnum):
    """Mirror of ``ember_lr_schedule``: the learning-rate schedule of a trainer."""

    CONSTANT = 0
    """The base rate throughout."""
    COSINE = 1
    """Linear warmup, then cosine decay to 0 at ``total_steps``."""
    WARMUP_CONSTANT = 2
    """Linear warmup, then constant (continual training)."""


#: The ``EMBER_TARGET_*`` bits of ``ember_train_params.lora_targets`` (LoRA targets).
TARGET_Q = 1
TARGET_K = 2
TARGET_V = 4
TARGET_O = 8
TARGET_GATE = 16
TARGET_UP = 32
TARGET_DOWN = 64


class EmberError(RuntimeError):
    """An Ember call failed.

    Attributes:
        status: the :class:`Status` the C library returned (a plain ``int`` for a code
            these bindings do not know).
        message: the detailed message (``ember_last_error()`` for errors from the library).
    """

    def __init__(self, status: int, message: str) -> None:
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        name = status.name if isinstance(status, Status) else str(status)
        super().__init__(f"[{name}] {message}")

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (type(self), (int(self.status), self.message))


# ---------------------------------------------------------------------------------------
# Structs (field for field as in ember.h)
# ---------------------------------------------------------------------------------------

#: ``ember_log_callback``: ``void (*)(enum ember_log_level, const char *, void *)``.
LOG_CALLBACK = CFUNCTYPE(None, c_int, c_char_p, c_void_p)
#: ``ember_progress_callback``: ``bool (*)(float progress, void *user_data)``.
PROGRESS_CALLBACK = CFUNCTYPE(c_bool, c_float, c_void_p)
#: ``ember_token_callback``: ``bool (*)(uint32_t, const char *, size_t, void *)``.
#: ``piece`` is declared ``c_void_p`` so that ctypes hands over the raw pointer (the piece
#: may be read with its exact length, including bytes after an embedded NUL).
TOKEN_CALLBACK = CFUNCTYPE(c_bool, c_uint32, c_void_p, c_size_t, c_void_p)


class ContextParams(Structure):
    """``ember_context_params``: how to create a context."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("backend", c_char_p),
        ("adapter", c_char_p),
        ("memory_budget", c_uint64),
        ("disable_f16", c_bool),
        ("disable_subgroups", c_bool),
    ]


class ModelParams(Structure):
    """``ember_model_params``: how to load a model."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("progress", PROGRESS_CALLBACK),
        ("progress_user_data", c_void_p),
    ]


class ModelInfoStruct(Structure):
    """``ember_model_info``: numbers describing a loaded model."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("vocab", c_uint32),
        ("hidden", c_uint32),
        ("n_layers", c_uint32),
        ("n_heads", c_uint32),
        ("n_kv_heads", c_uint32),
        ("head_dim", c_uint32),
        ("ff", c_uint32),
        ("train_ctx", c_uint32),
        ("bos", c_int32),
        ("eos", c_int32),
        ("n_params", c_uint64),
        ("weight_bytes", c_uint64),
        ("n_experts", c_uint32),
        ("n_experts_used", c_uint32),
        ("n_active_params", c_uint64),
    ]


class ChatMessageStruct(Structure):
    """``ember_chat_message``: one chat message."""

    _fields_ = [
        ("role", c_char_p),
        ("content", c_char_p),
    ]


class SessionParams(Structure):
    """``ember_session_params``: sizes of a session."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("n_ctx", c_uint32),
        ("n_seq", c_uint32),
        ("n_batch", c_uint32),
        ("kv_budget", c_uint64),
    ]


class SamplerParams(Structure):
    """``ember_sampler_params``: how a sequence picks tokens."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repeat_penalty", c_float),
        ("repeat_last_n", c_uint32),
        ("seed", c_uint64),
    ]


class GenerateParams(Structure):
    """``ember_generate_params``: what ``ember_session_generate`` produces."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("max_tokens", c_uint32),
        ("sampler", SamplerParams),
        ("stop", POINTER(c_char_p)),
        ("n_stop", c_size_t),
        ("chat", c_bool),
        ("on_token", TOKEN_CALLBACK),
        ("user_data", c_void_p),
        ("adapter", c_int32),
        ("adapter_scale", c_float),
    ]


class GenerateResult(Structure):
    """``ember_generate_result``: outcome of a generation."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("n_prompt_tokens", c_uint32),
        ("n_tokens", c_uint32),
        ("stop_reason", c_int),  # enum ember_stop_reason
        ("prefill_tok_s", c_double),
        ("decode_tok_s", c_double),
    ]


class TrainParamsStruct(Structure):
    """``ember_train_params``: what to train and how."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("lora_rank", c_uint32),
        ("lora_alpha", c_float),
        ("rslora", c_bool),
        ("lora_targets", c_uint32),
        ("prompt_tokens", c_uint32),
        ("prefix_tokens", c_uint32),
        ("init_adapter", c_void_p),  # const struct ember_adapter *
        ("seq_len", c_uint32),
        ("lr", c_float),
        ("weight_decay", c_float),
        ("max_grad_norm", c_float),
        ("beta1", c_float),
        ("beta2", c_float),
        ("eps", c_float),
        ("schedule", c_int),  # enum ember_lr_schedule
        ("warmup_steps", c_uint32),
        ("total_steps", c_uint32),
        ("seed", c_uint64),
        ("distill_weight", c_float),
        ("lora_experts", c_uint32),
        ("lora_top_k", c_uint32),
        ("switch_gates", c_bool),
        ("balance_loss", c_float),
        ("z_loss", c_float),
    ]


class StepResultStruct(Structure):
    """``ember_step_result``: what one optimizer step did."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("step", c_uint32),
        ("loss", c_double),
        ("grad_norm", c_float),
        ("lr", c_float),
        ("tokens", c_uint64),
        ("skipped", c_bool),
        ("seconds", c_double),
        ("aux_loss", c_double),
    ]


class LearnerParamsStruct(Structure):
    """``ember_learner_params``: how a learner learns."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("lora_rank", c_uint32),
        ("lora_alpha", c_float),
        ("lora_targets", c_uint32),
        ("seq_len", c_uint32),
        ("lr", c_float),
        ("steps_per_update", c_uint32),
        ("batch_size", c_uint32),
        ("update_every", c_uint32),
        ("replay_ratio", c_float),
        ("replay_capacity", c_uint32),
        ("replay_distill", c_bool),
        ("l2", c_float),
        ("ewc", c_float),
        ("ema", c_float),
        ("gate", c_bool),
        ("min_new_gain", c_double),
        ("max_retained_rise", c_double),
        ("seed", c_uint64),
        ("probe_limit", c_uint32),
        ("warmup_steps", c_uint32),
        ("max_answer_drop", c_double),
        ("answer_tokens", c_uint32),
        ("distill_weight", c_float),
    ]


#: ``ember_train_callback``:
#: ``bool (*)(uint32_t step, uint32_t total, const ember_step_result *, void *)``.
TRAIN_CALLBACK = CFUNCTYPE(c_bool, c_uint32, c_uint32, POINTER(StepResultStruct), c_void_p)


# Opaque handles are passed as void pointers.
_ctx_p = c_void_p
_model_p = c_void_p
_session_p = c_void_p
_adapter_p = c_void_p
_trainer_p = c_void_p
_learner_p = c_void_p
_u32_p = POINTER(c_uint32)

#: name -> (restype, argtypes) for every function of ember.h.
_PROTOTYPES = {
    "ember_version": (c_char_p, []),
    "ember_abi_version": (c_uint32, []),
    "ember_string_free": (None, [c_void_p]),
    "ember_set_log_callback": (None, [LOG_CALLBACK, c_void_p]),
    "ember_context_default_params": (ContextParams, []),
    "ember_context_create": (c_int, [POINTER(ContextParams), POINTER(_ctx_p)]),
    "ember_context_free": (None, [_ctx_p]),
    "ember_context_info_json": (c_int, [_ctx_p, POINTER(c_void_p)]),
    "ember_model_default_params": (ModelParams, []),
    "ember_model_load": (c_int, [_ctx_p, c_char_p, POINTER(ModelParams), POINTER(_model_p)]),
    "ember_model_free": (None, [_model_p]),
    "ember_model_get_info": (c_int, [_model_p, POINTER(ModelInfoStruct)]),
    "ember_model_info_json": (c_int, [_model_p, POINTER(c_void_p)]),
    "ember_tokenize": (
        c_int,
        [_model_p, c_char_p, c_size_t, c_bool, c_bool, _u32_p, c_size_t, POINTER(c_size_t)],
    ),
    "ember_detokenize": (
        c_int,
        [_model_p, _u32_p, c_size_t, c_bool, c_void_p, c_size_t, POINTER(c_size_t)],
    ),
    "ember_token_is_eog": (c_bool, [_model_p, c_uint32]),
    "ember_chat_template_apply": (
        c_int,
        [_model_p, POINTER(ChatMessageStruct), c_size_t, c_bool, POINTER(c_void_p)],
    ),
    "ember_session_default_params": (SessionParams, []),
    "ember_session_create": (c_int, [_model_p, POINTER(SessionParams), POINTER(_session_p)]),
    "ember_session_free": (None, [_session_p]),
    "ember_session_reset": (c_int, [_session_p]),
    "ember_session_expert_counts": (
        c_int,
        [_session_p, POINTER(c_uint64), c_size_t, POINTER(c_size_t)],
    ),
    "ember_session_reset_expert_counts": (c_int, [_session_p]),
    "ember_sampler_default_params": (SamplerParams, []),
    "ember_generate_default_params": (GenerateParams, []),
    "ember_session_generate": (
        c_int,
        [
            _session_p,
            c_char_p,
            POINTER(GenerateParams),
            POINTER(GenerateResult),
            POINTER(c_void_p),
        ],
    ),
    "ember_session_evaluate": (
        c_int,
        [_session_p, _u32_p, c_size_t, POINTER(c_float), c_size_t, POINTER(c_size_t)],
    ),
    "ember_session_perplexity": (
        c_int,
        [_session_p, c_char_p, c_uint32, POINTER(c_double), POINTER(c_size_t)],
    ),
    "ember_seq_add": (c_int, [_session_p, POINTER(SamplerParams), POINTER(c_uint64)]),
    "ember_seq_remove": (c_int, [_session_p, c_uint64]),
    "ember_seq_prefill": (c_int, [_session_p, c_uint64, _u32_p, c_size_t, _u32_p]),
    "ember_seq_decode": (c_int, [_session_p, POINTER(c_uint64), c_size_t, _u32_p]),
    "ember_debug_internal_panic": (c_int, []),
    "ember_adapter_load": (c_int, [_model_p, c_char_p, POINTER(_adapter_p)]),
    "ember_adapter_free": (None, [_adapter_p]),
    "ember_adapter_save": (c_int, [_adapter_p, _model_p, c_char_p]),
    "ember_adapter_info_json": (c_int, [_adapter_p, POINTER(c_void_p)]),
    "ember_adapter_combine": (
        c_int,
        [POINTER(_adapter_p), POINTER(c_float), c_size_t, POINTER(_adapter_p)],
    ),
    "ember_model_merge_adapters": (
        c_int,
        [_model_p, POINTER(_adapter_p), POINTER(c_float), c_size_t, POINTER(_model_p)],
    ),
    "ember_session_attach_adapter": (
        c_int,
        [_session_p, _adapter_p, c_char_p, POINTER(c_int32)],
    ),
    "ember_session_detach_adapter": (c_int, [_session_p, c_int32]),
    "ember_session_replace_adapter": (c_int, [_session_p, c_int32, _adapter_p]),
    "ember_session_set_adapter_scale": (c_int, [_session_p, c_int32, c_float]),
    "ember_seq_set_adapter": (c_int, [_session_p, c_uint64, c_int32, c_float]),
    "ember_status_str": (c_char_p, [c_int32]),
    "ember_last_error": (c_char_p, []),
    "ember_train_default_params": (TrainParamsStruct, []),
    "ember_trainer_create": (
        c_int,
        [_model_p, POINTER(TrainParamsStruct), POINTER(_trainer_p)],
    ),
    "ember_trainer_free": (None, [_trainer_p]),
    "ember_trainer_step": (c_int, [_trainer_p, c_char_p, POINTER(StepResultStruct)]),
    "ember_trainer_step_tokens": (
        c_int,
        [
            _trainer_p,
            _u32_p,
            POINTER(ctypes.c_uint8),
            POINTER(c_size_t),
            c_size_t,
            POINTER(StepResultStruct),
        ],
    ),
    "ember_trainer_train_file": (
        c_int,
        [_trainer_p, c_char_p, c_uint32, c_uint32, TRAIN_CALLBACK, c_void_p, POINTER(c_double)],
    ),
    "ember_trainer_evaluate": (c_int, [_trainer_p, c_char_p, POINTER(c_double)]),
    "ember_trainer_get_adapter": (c_int, [_trainer_p, POINTER(_adapter_p)]),
    "ember_trainer_save": (c_int, [_trainer_p, c_char_p]),
    "ember_trainer_info_json": (c_int, [_trainer_p, POINTER(c_void_p)]),
    "ember_learner_default_params": (LearnerParamsStruct, []),
    "ember_learner_open": (
        c_int,
        [_model_p, c_char_p, POINTER(LearnerParamsStruct), POINTER(_learner_p)],
    ),
    "ember_learner_free": (None, [_learner_p]),
    "ember_learner_add": (c_int, [_learner_p, c_char_p, POINTER(c_void_p)]),
    "ember_learner_set_probes": (c_int, [_learner_p, c_char_p, c_char_p]),
    "ember_learner_retain": (c_int, [_learner_p, c_char_p, POINTER(c_uint32)]),
    "ember_learner_set_answer_probes": (c_int, [_learner_p, c_char_p, c_char_p]),
    "ember_learner_update": (c_int, [_learner_p, POINTER(c_void_p)]),
    "ember_learner_rollback": (c_int, [_learner_p, c_uint32]),
    "ember_learner_get_adapter": (c_int, [_learner_p, POINTER(_adapter_p)]),
    "ember_learner_info_json": (c_int, [_learner_p, POINTER(c_void_p)]),
    "ember_learner_start_background": (c_int, [_learner_p]),
    "ember_learner_stop_background": (c_int, [_learner_p]),
    "ember_learner_request_update": (c_int, [_learner_p]),
    "ember_learner_wait": (c_int, [_learner_p]),
    "ember_learner_poll": (c_int, [_learner_p, POINTER(c_void_p)]),
}

#: Params structs whose library default reports its size: ctypes mirror -> default fn.
_SIZED_DEFAULTS = {
    ContextParams: "ember_context_default_params",
    ModelParams: "ember_model_default_params",
    SessionParams: "ember_session_default_params",
    SamplerParams: "ember_sampler_default_params",
    GenerateParams: "ember_generate_default_params",
    TrainParamsStruct: "ember_train_default_params",
    LearnerParamsStruct: "ember_learner_default_params",
}


# ---------------------------------------------------------------------------------------
# Finding and loading the library
# ---------------------------------------------------------------------------------------


def _lib_names() -> List[str]:
    if sys.platform == "win32":
        return ["ember.dll", "libember.dll"]
    if sys.platform == "darwin":
        return ["libember.dylib"]
    return ["libember.so"]


def _checkout_dirs() -> List[Path]:
    """``target/release`` (then ``target/debug``) of the repository this package sits in,
    when it is imported from a source checkout (``bindings/python/ember``)."""
    here = Path(__file__).resolve().parent
    out = []
    for root in list(here.parents)[:4]:
        if (root / "Cargo.toml").is_file() and (root / "capi").is_dir():
            target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
            out += [target / "release", target / "debug"]
            break
    return out


def find_library() -> Optional[str]:
    """Where the shared library is, in this order (the first that exists wins):

    1. ``$EMBER_LIBRARY`` (a path to ``libember.so`` / ``libember.dylib`` / ``ember.dll``);
    2. a copy bundled with the package, ``ember/_lib/``;
    3. ``ctypes.util.find_library("ember")`` (the system's search path);
    4. ``target/release`` of the repository when the package is used from a checkout.

    Returns the path (or, for 3, the name the loader resolves), or ``None``.
    """
    env = os.environ.get("EMBER_LIBRARY")
    if env:
        return env
    bundled = Path(__file__).resolve().parent / "_lib"
    for name in _lib_names():
        if (bundled / name).is_file():
            return str(bundled / name)
    found = ctypes.util.find_library("ember")
    if found:
        return found
    for d in _checkout_dirs():
        for name in _lib_names():
            if (d / name).is_file():
                return str(d / name)
    return None


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None


def _declare(dll: ctypes.CDLL) -> None:
    missing = []
    for name, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(dll, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    if missing:
        raise EmberError(
            Status.UNSUPPORTED,
            f"the Ember library lacks {', '.join(missing)} (is it older than these bindings?)",
        )


def lib() -> ctypes.CDLL:
    """The loaded shared library (loaded, declared and ABI-checked on first use).

    Raises:
        EmberError: ``Status.IO`` when no library is found or it cannot be loaded;
            ``Status.UNSUPPORTED`` when its ABI version is not :data:`ABI_VERSION`, a
            function is missing, or a struct size disagrees with the library's.
    """
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = find_library()
        if path is None:
            raise EmberError(
                Status.IO,
                "the Ember shared library was not found: set EMBER_LIBRARY to the path of "
                "libember.so / libember.dylib / ember.dll, or build it with "
                "`cargo build --release -p ember-capi`",
            )
        try:
            dll = ctypes.CDLL(path)
        except OSError as e:
            raise EmberError(Status.IO, f"cannot load the Ember library {path}: {e}") from None
        if not hasattr(dll, "ember_abi_version"):
            raise EmberError(Status.UNSUPPORTED, f"{path} is not the Ember library")
        dll.ember_abi_version.restype = c_uint32
        dll.ember_abi_version.argtypes = []
        abi = dll.ember_abi_version()
        if abi != ABI_VERSION:
            raise EmberError(
                Status.UNSUPPORTED,
                f"{path} has ABI version {abi}; these bindings need {ABI_VERSION}",
            )
        _declare(dll)
        for struct, fn in _SIZED_DEFAULTS.items():
            reported = getattr(dll, fn)().struct_size
            if reported != ctypes.sizeof(struct):
                raise EmberError(
                    Status.UNSUPPORTED,
                    f"{fn}() reports struct_size {reported}, the Python mirror "
                    f"{struct.__name__} has {ctypes.sizeof(struct)}: bindings and library "
                    "disagree",
                )
        _lib, _lib_path = dll, path
        return dll


def lib_path() -> str:
    """The path (or name) the library was loaded from (loads it if needed)."""
    lib()
    assert _lib_path is not None
    return _lib_path


# ---------------------------------------------------------------------------------------
# Helpers shared by the high-level API
# ---------------------------------------------------------------------------------------


def last_error() -> str:
    """This thread's ``ember_last_error()`` as text."""
    raw = lib().ember_last_error()
    return raw.decode("utf-8", "replace") if raw else ""


def check(status: int, what: str = "") -> None:
    """Raises :class:`EmberError` for a status other than ``EMBER_OK``, with the thread's
    last error message (read right away, on the calling thread)."""
    if status != Status.OK:
        msg = last_error() or what or lib().ember_status_str(status).decode()
        raise EmberError(status, msg)


def take_string(p: c_void_p) -> str:
    """Copies a ``char *`` the library returned, frees it, and returns it as text."""
    if not p.value:
        return ""
    try:
        return ctypes.string_at(p.value).decode("utf-8", "replace")
    finally:
        lib().ember_string_free(p)
