"""The Pythonic layer over :mod:`ember._ffi`: handles as classes, errors as exceptions."""

from __future__ import annotations

import array
import ctypes
import json
import operator
import os
import threading
import time
from ctypes import byref, c_char_p, c_double, c_float, c_int32, c_size_t, c_uint32
from ctypes import c_uint64, c_void_p
import dataclasses
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence as SequenceT,
    Tuple,
    Union,
)

from . import _ffi
from ._ffi import EmberError, LogLevel, LrSchedule, Status, StopReason, check, lib, take_string

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "Adapter",
    "Context",
    "Generation",
    "Model",
    "ModelInfo",
    "Sequence",
    "Session",
    "Stream",
    "StepResult",
    "TrainParams",
    "Trainer",
    "abi_version",
    "set_log_callback",
    "status_str",
    "version",
]


# ---------------------------------------------------------------------------------------
# Argument checking (in Python, before anything reaches C)
# ---------------------------------------------------------------------------------------


def _cstr(value: Any, what: str, *, allow_none: bool = False) -> Optional[bytes]:
    """UTF-8 bytes for a NUL-terminated C string parameter."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not encodable as UTF-8: {e}") from None


def _path(value: Any, what: str = "path") -> bytes:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, not {type(value).__name__}")
    p = os.fspath(value)
    if isinstance(p, bytes):
        try:
            p = p.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not valid UTF-8") from None
    b = _cstr(p, what)
    assert b is not None
    return b


def _uint(value: Any, what: str, bits: int = 32, *, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None
    if v < minimum or v >= 1 << bits:
        raise ValueError(f"{what} must be in [{minimum}, {(1 << bits) - 1}], got {v}")
    return v


def _float(value: Any, what: str) -> float:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{what} must not be NaN")
    return v


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def _token_array(tokens: Any, what: str = "tokens") -> "array.array[int]":
    """A ``uint32`` array of token ids (checked: ints in range)."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, not {type(tokens).__name__}")
    try:
        import numpy as np  # noqa: F401

        if isinstance(tokens, np.ndarray):
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise TypeError(f"{what} must be a 1-D integer array")
            tokens = tokens.tolist()
    except ImportError:
        pass
    out = array.array("I" if array.array("I").itemsize == 4 else "L")
    assert out.itemsize == 4
    for i, t in enumerate(tokens):
        out.append(_uint(t, f"{what}[{i}]"))
    return out


def _u32_ptr(arr: "array.array[int]") -> Any:
    if len(arr) == 0:
        return (c_uint32 * 1)()
    return (c_uint32 * len(arr)).from_buffer(arr)


# ---------------------------------------------------------------------------------------
# Callbacks: exceptions are caught in C's frame and re-raised after the call
# ---------------------------------------------------------------------------------------


def _piece(ptr: Optional[int], n: int) -> str:
    """The ``n`` bytes at ``ptr`` (a callback's piece) as text."""
    if not n or not ptr:
        return ""
    return ctypes.string_at(ptr, n).decode("utf-8", "replace")


class _Trap:
    """Holds the first exception raised inside a callback during one C call."""

    __slots__ = ("exc",)

    def __init__(self) -> None:
        self.exc: Optional[BaseException] = None

    def reraise(self) -> None:
        if self.exc is not None:
            exc, self.exc = self.exc, None
            raise exc


# ---------------------------------------------------------------------------------------
# Module-level functions
# ---------------------------------------------------------------------------------------


def version() -> str:
    """The library's version string (``ember_version()``), e.g. ``"0.1.0"``."""
    return lib().ember_version().decode()


def abi_version() -> int:
    """The library's ABI version (``ember_abi_version()``); these bindings need 1."""
    return int(lib().ember_abi_version())


def status_str(status: int) -> str:
    """The C name of a status code, e.g. ``status_str(3) == "EMBER_FORMAT"``."""
    return lib().ember_status_str(_uint(status, "status", 31)).decode()


_log_cb: Any = None  # keeps the ctypes trampoline alive while installed


def set_log_callback(callback: Optional[Callable[[LogLevel, str], Any]]) -> None:
    """Routes Ember's log messages to ``callback(level, message)`` (``None`` turns it off).

    The callback may be called from any thread Ember runs on; exceptions it raises are
    ignored (a log call cannot fail).
    """
    global _log_cb
    if callback is None:
        lib().ember_set_log_callback(_ffi.LOG_CALLBACK(), None)
        _log_cb = None
        return
    if not callable(callback):
        raise TypeError("callback must be callable or None")

    def tramp(level: int, message: Optional[bytes], _ud: Optional[int]) -> None:
        try:
            try:
                lv: Any = LogLevel(level)
            except ValueError:
                lv = level
            callback(lv, (message or b"").decode("utf-8", "replace"))
        except BaseException:  # noqa: BLE001 - must not unwind into C
            pass

    cb = _ffi.LOG_CALLBACK(tramp)
    lib().ember_set_log_callback(cb, None)
    _log_cb = cb


# ---------------------------------------------------------------------------------------
# Handles
# ---------------------------------------------------------------------------------------


class _Handle:
    """Owns one C handle: ``close()`` frees it once; ``with`` closes it on exit."""

    _ptr: Optional[int] = None
    _free_name = ""
    _kind = "handle"

    def _raw(self) -> int:
        p = self._ptr
        if p is None:
            raise EmberError(Status.INVALID_ARGUMENT, f"this {self._kind} is closed")
        return p

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None

    def _free(self) -> None:
        p, self._ptr = self._ptr, None
        if p is not None:
            getattr(lib(), self._free_name)(c_void_p(p))

    def close(self) -> None:
        """Frees the handle. Idempotent; the object is unusable afterwards."""
        self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be half torn down
            pass


class Context(_Handle):
    """A GPU device and its caches (``ember_context``). Thread-safe.

    Args:
        backend: ``"vulkan"``, ``"metal"``, ``"dx12"``, ``"gl"`` or ``"any"``; ``None``
            reads ``$EMBER_BACKEND``.
        adapter: adapter index (``"0"`` or ``0``) or a name substring; ``None`` reads
            ``$EMBER_ADAPTER``.
        memory_budget: device memory budget in bytes (0: the device's limits).
        disable_f16: do not use SHADER_F16 even if available.
        disable_subgroups: do not use subgroup operations even if available.

    Raises:
        EmberError: ``Status.DEVICE_LOST`` when no adapter matches, and so on.
    """

    _free_name = "ember_context_free"
    _kind = "Context"

    def __init__(
        self,
        backend: Optional[str] = None,
        adapter: Union[str, int, None] = None,
        memory_budget: int = 0,
        *,
        disable_f16: bool = False,
        disable_subgroups: bool = False,
    ) -> None:
        if isinstance(adapter, int) and not isinstance(adapter, bool):
            adapter = str(_uint(adapter, "adapter"))
        b_backend = _cstr(backend, "backend", allow_none=True)
        b_adapter = _cstr(adapter, "adapter", allow_none=True)
        budget = _uint(memory_budget, "memory_budget", 64)
        L = lib()
        p = L.ember_context_default_params()
        p.backend = b_backend
        p.adapter = b_adapter
        p.memory_budget = budget
        p.disable_f16 = _bool(disable_f16, "disable_f16")
        p.disable_subgroups = _bool(disable_subgroups, "disable_subgroups")
        out = c_void_p()
        check(L.ember_context_create(byref(p), byref(out)))
        self._ptr = out.value

    @property
    def info(self) -> Dict[str, Any]:
        """The adapter's description (``ember_context_info_json``): ``{"adapter": {name,
        backend, driver, ...}, "capabilities": {...}}``."""
        out = c_void_p()
        check(lib().ember_context_info_json(self._raw(), byref(out)))
        return json.loads(take_string(out))

    def load(self, path: PathLike, progress: Optional[Callable[[float], Any]] = None) -> "Model":
        """Shorthand for :class:`Model` ``(self, path, progress)``."""
        return Model(self, path, progress)

    def __repr__(self) -> str:
        if self.closed:
            return "<ember.Context closed>"
        try:
            a = self.info.get("adapter", {})
            return f"<ember.Context {a.get('name', '?')!r} ({a.get('backend', '?')})>"
        except EmberError:
            return "<ember.Context>"


@dataclass(frozen=True)
class ModelInfo:
    """Numbers describing a loaded model (``ember_model_info``)."""

    vocab: int
    """Vocabulary size."""
    hidden: int
    """Hidden size."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads."""
    head_dim: int
    """Head size."""
    ff: int
    """Feed-forward size."""
    train_ctx: int
    """Training context length."""
    bos: Optional[int]
    """BOS token id, or ``None``."""
    eos: Optional[int]
    """EOS token id, or ``None``."""
    n_params: int
    """Parameter count."""
    weight_bytes: int
    """Device bytes taken by the weights."""
    n_experts: int = 0
    """Routed experts per layer of a Mixture-of-Experts model (0 for a dense model)."""
    n_experts_used: int = 0
    """Experts each token uses (0 for a dense model)."""
    n_active_params: int = 0
    """Parameters one token goes through (``n_params`` for a dense model)."""

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict."""
        return dict(self.__dict__)


def _message(m: Any, i: int) -> Tuple[bytes, bytes]:
    if isinstance(m, Mapping):
        if "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] needs 'role' and 'content' keys")
        role, content = m["role"], m["content"]
    elif isinstance(m, tuple) and len(m) == 2:
        role, content = m
    else:
        raise TypeError(
            f"messages[{i}] must be a dict with 'role' and 'content' (or a (role, content) "
            f"tuple), not {type(m).__name__}"
        )
    r = _cstr(role, f"messages[{i}]['role']")
    c = _cstr(content, f"messages[{i}]['content']")
    assert r is not None and c is not None
    return r, c


def _adapter_array(adapters: Any, weights: Any) -> Tuple[Any, Any, int]:
    """C arrays of adapter handles and strengths (``None``: all 1) for combine and merge."""
    items = list(adapters)
    if not items or not all(isinstance(a, Adapter) for a in items):
        raise TypeError("adapters must be a non-empty list of ember.Adapter")
    ptrs = (c_void_p * len(items))(*[a._raw() for a in items])
    w = None
    if weights is not None:
        wl = [_float(x, f"weights[{i}]") for i, x in enumerate(weights)]
        if len(wl) != len(items):
            raise ValueError("weights must have one entry per adapter")
        w = (c_float * len(wl))(*wl)
    return ptrs, w, len(items)


class Model(_Handle):
    """A loaded model: weights on the device, tokenizer, chat template (``ember_model``).

    Immutable and thread-safe. Sessions keep it alive: :meth:`close` on a model that live
    sessions use makes the Python object unusable but frees the C handle only when the last
    of them closes.

    Args:
        ctx: the :class:`Context` (device) to load onto.
        path: a GGUF file, or an HF model directory (``config.json``,
            ``model.safetensors`` or shards, ``tokenizer.json``).
        progress: optional ``progress(fraction) -> bool`` called during loading with the
            fraction done (0..1). Returning ``False`` aborts the load (``EmberError`` with
            ``Status.ABORTED``); ``None`` or any true value continues. An exception it
            raises aborts the load and is re-raised here.

    Raises:
        EmberError: ``Status.IO`` (missing/unreadable file), ``Status.FORMAT`` (malformed),
            ``Status.UNSUPPORTED``, ``Status.OUT_OF_MEMORY``, ``Status.ABORTED``.
        TypeError: ``ctx`` is not a Context, ``path`` not a path, ``progress`` not callable.
    """

    _free_name = "ember_model_free"
    _kind = "Model"

    def __init__(
        self,
        ctx: Context,
        path: PathLike,
        progress: Optional[Callable[[float], Any]] = None,
    ) -> None:
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be an ember.Context, not {type(ctx).__name__}")
        b_path = _path(path)
        if progress is not None and not callable(progress):
            raise TypeError("progress must be callable or None")
        L = lib()
        p = L.ember_model_default_params()
        trap = _Trap()
        if progress is not None:

            def tramp(fraction: float, _ud: Optional[int]) -> bool:
                if trap.exc is not None:
                    return False
                try:
                    r = progress(float(fraction))
                    return True if r is None else bool(r)
                except BaseException as e:  # noqa: BLE001 - re-raised after the C call
                    trap.exc = e
                    return False

            cb = _ffi.PROGRESS_CALLBACK(tramp)
            p.progress = cb
        out = c_void_p()
        status = L.ember_model_load(ctx._raw(), b_path, byref(p), byref(out))
        if trap.exc is not None and out.value:
            L.ember_model_free(out)  # loaded although the callback failed: do not leak it
        trap.reraise()
        check(status)
        self._ptr = out.value
        self._ctx = ctx
        self._path = os.fspath(path)
        self._info: Optional[ModelInfo] = None
        self._anchor: Optional[Tuple[List[int], str]] = None

    # -- lifetime ---------------------------------------------------------------------

    def _handle(self) -> int:
        """The C handle for internal use by sessions (works while they keep it alive)."""
        with self._lock:
            p = self._ptr
        if p is None:
            raise EmberError(Status.INVALID_ARGUMENT, "this Model is closed")
        return p

    def _raw(self) -> int:
        if self._closing:
            raise EmberError(Status.INVALID_ARGUMENT, "this Model is closed")
        return super()._raw()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing or self._ptr is None

    def _acquire(self) -> int:
        with self._lock:
            if self._closing or self._ptr is None:
                raise EmberError(Status.INVALID_ARGUMENT, "this Model is closed")
            self._users += 1
            return self._ptr

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            free = self._closing and self._users == 0
        if free:
            self._free()

    def close(self) -> None:
        """Releases the model. Idempotent. If sessions still use it, the C handle is freed
        when the last of them closes; this object is unusable either way."""
        with self._lock:
            self._closing = True
            free = self._users == 0
        if free:
            self._free()

    def merge(
        self, adapters: SequenceT["Adapter"], weights: Optional[SequenceT[float]] = None
    ) -> "Model":
        """A new model with LoRA ``adapters`` (at strengths ``weights``, default all 1;
        negative subtracts) merged into this model's f32/f16 weights
        (``ember_model_merge_adapters``). This model is unchanged, so unmerging is exact:
        keep using it. Untouched tensors are shared. Quantized bases raise ``EmberError``
        with ``Status.UNSUPPORTED``."""
        ptrs, w, n = _adapter_array(adapters, weights)
        out = c_void_p()
        check(lib().ember_model_merge_adapters(self._raw(), ptrs, w, n, byref(out)))
        m = Model.__new__(Model)
        m._users = 0
        m._closing = False
        m._lock = threading.Lock()
        m._ptr = out.value
        m._ctx = self._ctx
        m._path = self._path
        m._info = None
        m._anchor = None
        return m

    # -- queries ----------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The path the model was loaded from."""
        return self._path

    @property
    def info(self) -> ModelInfo:
        """Sizes and special tokens (``ember_model_get_info``)."""
        if self._info is None:
            s = _ffi.ModelInfoStruct()
            s.struct_size = ctypes.sizeof(s)
            check(lib().ember_model_get_info(self._raw(), byref(s)))
            self._info = ModelInfo(
                vocab=s.vocab,
                hidden=s.hidden,
                n_layers=s.n_layers,
                n_heads=s.n_heads,
                n_kv_heads=s.n_kv_heads,
                head_dim=s.head_dim,
                ff=s.ff,
                train_ctx=s.train_ctx,
                bos=None if s.bos < 0 else s.bos,
                eos=None if s.eos < 0 else s.eos,
                n_params=s.n_params,
                weight_bytes=s.weight_bytes,
                n_experts=s.n_experts,
                n_experts_used=s.n_experts_used,
                n_active_params=s.n_active_params,
            )
        else:
            self._raw()
        return self._info

    @property
    def details(self) -> Dict[str, Any]:
        """The model's JSON description (``ember_model_info_json``): config, source and
        weight formats."""
        out = c_void_p()
        check(lib().ember_model_info_json(self._raw(), byref(out)))
        return json.loads(take_string(out))

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (``info.vocab``)."""
        return self.info.vocab

    # -- tokenizer --------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = False) -> List[int]:
        """Token ids of ``text``.

        Args:
            text: the text.
            add_bos: add the model's BOS token if its tokenizer asks for one.
            parse_special: turn special-token text such as ``<|im_start|>`` into its id
                (otherwise it is tokenized as plain text).
        """
        return self._tokenize(self._raw(), text, add_bos, parse_special)

    def _tokenize(self, h: int, text: str, add_bos: bool, parse_special: bool) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        _bool(add_bos, "add_bos")
        _bool(parse_special, "parse_special")
        try:
            b = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not encodable as UTF-8: {e}") from None
        L = lib()
        cap = len(b) + 8
        n = c_size_t()
        while True:
            buf = (c_uint32 * cap)()
            st = L.ember_tokenize(h, b, len(b), add_bos, parse_special, buf, cap, byref(n))
            if st == Status.BUFFER_TOO_SMALL and n.value > cap:
                cap = n.value
                continue
            check(st)
            return list(buf[: n.value])

    def detokenize(self, ids: SequenceT[int], skip_special: bool = False) -> str:
        """The text of token ids (``ember_detokenize``).

        Args:
            ids: token ids (ints below the vocabulary size).
            skip_special: leave out control tokens (BOS, ``<|im_end|>``, ...).

        Raises:
            TypeError / ValueError: ``ids`` is not a sequence of ints in ``[0, 2**32)``.
            EmberError: ``Status.INVALID_ARGUMENT`` for an id outside the vocabulary.
        """
        arr = _token_array(ids, "ids")
        return self._detokenize(self._raw(), arr, _bool(skip_special, "skip_special"))

    def _detokenize(self, h: int, arr: "array.array[int]", skip_special: bool) -> str:
        L = lib()
        cap = 16 * len(arr) + 16
        n = c_size_t()
        ptr = _u32_ptr(arr)
        while True:
            buf = ctypes.create_string_buffer(cap)
            st = L.ember_detokenize(h, ptr, len(arr), skip_special, buf, cap, byref(n))
            if st == Status.BUFFER_TOO_SMALL and n.value + 1 > cap:
                cap = n.value + 1
                continue
            check(st)
            return buf.raw[: n.value].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, end-of-turn)."""
        return bool(lib().ember_token_is_eog(self._raw(), _uint(token, "token")))

    def apply_chat_template(
        self,
        messages: SequenceT[Union[Mapping[str, str], Tuple[str, str]]],
        add_generation_prompt: bool = True,
    ) -> str:
        """Renders chat messages with the model's chat template.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``
                (``(role, content)`` tuples are accepted too).
            add_generation_prompt: append the opening of the assistant's turn.

        Returns:
            The prompt text (special tokens as text: tokenize it with
            ``parse_special=True``).
        """
        return self._apply_chat_template(self._raw(), messages, add_generation_prompt)

    def _apply_chat_template(self, h: int, messages: Any, add_generation_prompt: bool) -> str:
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise TypeError("messages must be a list of {'role', 'content'} dicts")
        _bool(add_generation_prompt, "add_generation_prompt")
        pairs = [_message(m, i) for i, m in enumerate(messages)]
        arr = (_ffi.ChatMessageStruct * max(1, len(pairs)))()
        for i, (r, c) in enumerate(pairs):
            arr[i].role = r
            arr[i].content = c
        out = c_void_p()
        check(
            lib().ember_chat_template_apply(h, arr, len(pairs), add_generation_prompt, byref(out))
        )
        return take_string(out)

    def _stream_anchor(self, h: int) -> Tuple[List[int], str]:
        """A plain token whose text is prefixed to incremental detokenization, so that
        a tokenizer which drops the leading space of the first token does not drop it
        from a piece in the middle of a generation."""
        if self._anchor is None:
            ids = self._tokenize(h, "a", False, False)
            text = self._detokenize(h, _token_array(ids), True) if ids else ""
            self._anchor = (ids, text)
        return self._anchor

    def session(
        self, n_ctx: int = 2048, n_seq: int = 1, n_batch: int = 256, **kw: Any
    ) -> "Session":
        """Shorthand for :class:`Session` ``(self, n_ctx, n_seq, n_batch, ...)``."""
        return Session(self, n_ctx, n_seq, n_batch, **kw)

    def trainer(self, params: Optional["TrainParams"] = None, **kw: Any) -> "Trainer":
        """Shorthand for :class:`Trainer` ``(self, params, **kw)``, e.g.
        ``model.trainer(lora_rank=8, targets=["q", "v"], lr=1e-3)``."""
        return Trainer(self, params, **kw)

    def __repr__(self) -> str:
        if self.closed:
            return "<ember.Model closed>"
        i = self.info
        return (
            f"<ember.Model {os.path.basename(self._path)!r} vocab={i.vocab} "
            f"layers={i.n_layers} hidden={i.hidden}>"
        )


@dataclass
class Generation:
    """The result of :meth:`Session.generate` (and of a finished :class:`Stream`)."""

    text: str
    """The generated text (without the prompt and without a stop string)."""
    tokens: List[int]
    """The generated token ids."""
    n_prompt_tokens: int
    """Prompt length in tokens."""
    stop_reason: StopReason
    """Why it ended."""
    prefill_tok_s: float
    """Prompt processing speed (tokens/s)."""
    decode_tok_s: float
    """Generation speed (tokens/s)."""

    @property
    def n_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.tokens)

    @property
    def tok_s(self) -> float:
        """Generation speed in tokens/s (same as :attr:`decode_tok_s`)."""
        return self.decode_tok_s


def _sampler(
    temperature: Any,
    top_k: Any,
    top_p: Any,
    min_p: Any,
    repeat_penalty: Any,
    repeat_last_n: Any,
    seed: Any,
    out: Optional[_ffi.SamplerParams] = None,
) -> _ffi.SamplerParams:
    s = out if out is not None else lib().ember_sampler_default_params()
    t = _float(temperature, "temperature")
    if t < 0:
        raise ValueError("temperature must be >= 0")
    s.temperature = t
    s.top_k = _uint(top_k, "top_k")
    p = _float(top_p, "top_p")
    if not 0.0 <= p <= 1.0:
        raise ValueError("top_p must be in [0, 1]")
    s.top_p = p
    m = _float(min_p, "min_p")
    if not 0.0 <= m <= 1.0:
        raise ValueError("min_p must be in [0, 1]")
    s.min_p = m
    r = _float(repeat_penalty, "repeat_penalty")
    if r <= 0:
        raise ValueError("repeat_penalty must be > 0")
    s.repeat_penalty = r
    if repeat_last_n is not None:
        s.repeat_last_n = _uint(repeat_last_n, "repeat_last_n")
    s.seed = _uint(seed, "seed", 64)
    return s


def _stop_list(stop: Any) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, Iterable):
        raise TypeError("stop must be a str, a list of str, or None")
    out = []
    for i, s in enumerate(stop):
        _cstr(s, f"stop[{i}]")
        out.append(s)
    return out


class Session(_Handle):
    """A key/value cache with its sequences (``ember_session``).

    Use one session from one thread at a time (calls are serialized by a lock; different
    sessions run in parallel). The session keeps its :class:`Model` alive.

    Args:
        model: the model to run.
        n_ctx: tokens each sequence can hold (0: the model's training context).
        n_seq: sequences that can be active at once (a generation, a stream, an
            :meth:`evaluate` or a :class:`Sequence` each take one while they run).
        n_batch: tokens per prefill chunk.
        kv_budget: bytes the key/value cache may take (0: no limit beyond the device's).
    """

    _free_name = "ember_session_free"
    _kind = "Session"

    def __init__(
        self,
        model: Model,
        n_ctx: int = 2048,
        n_seq: int = 1,
        n_batch: int = 256,
        *,
        kv_budget: int = 0,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be an ember.Model, not {type(model).__name__}")
        L = lib()
        p = L.ember_session_default_params()
        p.n_ctx = _uint(n_ctx, "n_ctx")
        p.n_seq = _uint(n_seq, "n_seq", minimum=1)
        p.n_batch = _uint(n_batch, "n_batch", minimum=1)
        p.kv_budget = _uint(kv_budget, "kv_budget", 64)
        info = model.info  # raises if the model is closed
        mh = model._acquire()
        out = c_void_p()
        try:
            check(L.ember_session_create(mh, byref(p), byref(out)))
        except BaseException:
            model._release()
            raise
        self._ptr = out.value
        self._model = model
        self._vocab = info.vocab
        self._n_ctx = p.n_ctx if p.n_ctx else info.train_ctx
        self._lock = threading.RLock()

    def _free(self) -> None:
        p = self._ptr
        super()._free()
        if p is not None:
            self._model._release()

    @property
    def model(self) -> Model:
        """The model this session runs."""
        return self._model

    @property
    def n_ctx(self) -> int:
        """Tokens each sequence can hold."""
        return self._n_ctx

    def reset(self) -> None:
        """Forgets every sequence of the session (the cache is reused)."""
        with self._lock:
            check(lib().ember_session_reset(self._raw()))

    def expert_counts(self) -> List[List[int]]:
        """Mixture-of-Experts loads (``ember_session_expert_counts``): for each layer, how
        many tokens went to each expert since the session began or
        :meth:`reset_expert_counts`. Empty for a dense model."""
        info = self._model.info
        with self._lock:
            n = c_size_t()
            cap = info.n_layers * info.n_experts
            buf = (ctypes.c_uint64 * max(cap, 1))()
            check(lib().ember_session_expert_counts(self._raw(), buf, cap, byref(n)))
            flat = list(buf[: n.value])
        e = info.n_experts
        return [flat[i : i + e] for i in range(0, len(flat), e)] if e else []

    def reset_expert_counts(self) -> None:
        """Zeroes the counters of :meth:`expert_counts`."""
        with self._lock:
            check(lib().ember_session_reset_expert_counts(self._raw()))

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, SequenceT[str], None] = None,
        chat: bool = False,
        *,
        repeat_last_n: Optional[int] = None,
        on_token: Optional[Callable[[int, str], Any]] = None,
        adapter: Optional[int] = None,
        adapter_scale: float = 1.0,
    ) -> Generation:
        """Generates a continuation of ``prompt`` (``ember_session_generate``).

        Args:
            prompt: the prompt text (special-token text in it is parsed, BOS is added).
            max_tokens: tokens to generate at most.
            temperature: 0 is greedy.
            top_k: 0 is off (at most 1024 tokens are considered).
            top_p: 1 is off.
            min_p: 0 is off.
            repeat_penalty: 1 is off.
            seed: random seed (the same seed gives the same text).
            stop: a stop string or a list of them (not included in the text).
            chat: wrap the prompt as a user message of the model's chat template.
            repeat_last_n: recent tokens the penalty looks at (``None``: the library's
                default).
            on_token: optional ``on_token(token_id, piece) -> bool`` called as tokens are
                produced (the C library's token callback; ``piece`` is empty while a UTF-8
                character is incomplete, and a final unfinished sequence comes with token
                id ``-1``). Returning ``False`` stops the generation (``stop_reason`` is then
                ``StopReason.CALLBACK``; no exception). An exception it raises stops the
                generation and is re-raised. Pieces are passed as the library produces
                them: the beginning of a stop string that spans several tokens may already
                have been passed when the stop string is found (the returned ``text`` never
                contains it); :meth:`stream` holds such text back.
            adapter: an adapter id from :meth:`attach_adapter` (``None``: the base model).
            adapter_scale: the adapter's strength.

        Returns:
            A :class:`Generation`.
        """
        b_prompt = _cstr(prompt, "prompt")
        stops = _stop_list(stop)
        if on_token is not None and not callable(on_token):
            raise TypeError("on_token must be callable or None")
        L = lib()
        p = L.ember_generate_default_params()
        p.max_tokens = _uint(max_tokens, "max_tokens")
        _sampler(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, p.sampler)
        stop_bytes = [s.encode("utf-8") for s in stops]
        stop_arr = (c_char_p * max(1, len(stop_bytes)))(*stop_bytes)
        if stop_bytes:
            p.stop = stop_arr
            p.n_stop = len(stop_bytes)
        p.chat = _bool(chat, "chat")
        p.adapter = -1 if adapter is None else _uint(adapter, "adapter", 31)
        p.adapter_scale = _float(adapter_scale, "adapter_scale")
        tokens: List[int] = []
        trap = _Trap()

        def tramp(token: int, piece: Optional[int], n: int, _ud: Optional[int]) -> bool:
            if token == 0xFFFFFFFF:  # the decoder's final flush, not a token
                text_piece = _piece(piece, n)
                if on_token is not None and trap.exc is None and text_piece:
                    try:
                        on_token(-1, text_piece)
                    except BaseException as e:  # noqa: BLE001
                        trap.exc = e
                return trap.exc is None
            tokens.append(token)
            if on_token is None or trap.exc is not None:
                return trap.exc is None
            try:
                text_piece = _piece(piece, n)
                r = on_token(int(token), text_piece)
                return True if r is None else bool(r)
            except BaseException as e:  # noqa: BLE001 - re-raised after the C call
                trap.exc = e
                return False

        cb = _ffi.TOKEN_CALLBACK(tramp)
        p.on_token = cb
        res = _ffi.GenerateResult()
        res.struct_size = ctypes.sizeof(res)
        out = c_void_p()
        with self._lock:
            st = L.ember_session_generate(self._raw(), b_prompt, byref(p), byref(res), byref(out))
            text = take_string(out)
            trap.reraise()
            if st != Status.ABORTED:
                check(st)
        try:
            reason: StopReason = StopReason(res.stop_reason)
        except ValueError:  # pragma: no cover - a newer library
            reason = res.stop_reason  # type: ignore[assignment]
        return Generation(
            text=text,
            tokens=tokens,
            n_prompt_tokens=int(res.n_prompt_tokens),
            stop_reason=reason,
            prefill_tok_s=float(res.prefill_tok_s),
            decode_tok_s=float(res.decode_tok_s),
        )

    def stream(
        self,
        prompt: Union[str, SequenceT[int]],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        stop: Union[str, SequenceT[str], None] = None,
        chat: bool = False,
        *,
        repeat_last_n: Optional[int] = None,
        adapter: Optional[int] = None,
        adapter_scale: float = 1.0,
    ) -> "Stream":
        """Generates like :meth:`generate`, yielding text pieces as they are produced.

        Runs step by step on the calling thread with the sequence API (prefill, then one
        decode per token), so nothing runs between two ``next()`` calls. It produces the
        same tokens as :meth:`generate` with the same arguments, and the pieces join to
        the same text: a piece never splits a UTF-8 character, and text that could be the
        start of a stop string is held back until it is known not to be one.

        NUL characters in the output come out as spaces, as in :meth:`generate` (whose C
        strings cannot hold them).

        ``prompt`` may also be a list of token ids (used as is; ``chat`` must then be
        false). The returned :class:`Stream` is an iterator of ``str``; after it is
        exhausted its ``result`` holds the :class:`Generation`. Close it (or use it in a
        ``with`` block) to stop early and free its sequence slot.
        """
        if isinstance(prompt, str):
            pass
        elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
            raise TypeError("prompt must be a str or a list of token ids")
        else:
            prompt = list(_token_array(prompt, "prompt"))
            if chat:
                raise ValueError("chat=True needs a text prompt")
            if not prompt:
                raise ValueError("the prompt is empty")
        if isinstance(prompt, str):
            _cstr(prompt, "prompt")
        sampler = _sampler(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        stops = [s for s in _stop_list(stop) if s]
        opts = dict(
            max_tokens=_uint(max_tokens, "max_tokens"),
            chat=_bool(chat, "chat"),
            adapter=None if adapter is None else _uint(adapter, "adapter", 31),
            adapter_scale=_float(adapter_scale, "adapter_scale"),
        )
        self._raw()
        return Stream(self, prompt, sampler, stops, **opts)  # type: ignore[arg-type]

    # -- scoring ----------------------------------------------------------------------

    def evaluate(self, tokens: SequenceT[int]) -> Any:
        """Logits of every position of ``tokens`` run through a fresh sequence.

        Returns:
            A ``numpy.ndarray`` of shape ``[len(tokens), vocab]`` (float32) when numpy is
            importable, else a list of ``len(tokens)`` lists of ``vocab`` floats. Row ``i``
            scores the token that follows ``tokens[: i + 1]``.
        """
        arr = _token_array(tokens)
        if len(arr) == 0:
            raise ValueError("tokens is empty")
        n, vocab = len(arr), self._vocab
        L = lib()
        try:
            import numpy as np
        except ImportError:
            np = None  # type: ignore[assignment]
        need = c_size_t()
        if np is not None:
            logits = np.empty((n, vocab), dtype=np.float32)
            dst = logits.ctypes.data_as(ctypes.POINTER(c_float))
        else:
            buf = (c_float * (n * vocab))()
            dst = buf
        with self._lock:
            check(
                L.ember_session_evaluate(self._raw(), _u32_ptr(arr), n, dst, n * vocab, byref(need))
            )
        if np is not None:
            return logits
        flat = list(buf)
        return [flat[i * vocab : (i + 1) * vocab] for i in range(n)]

    def perplexity(self, text: str, window: int = 512, *, return_count: bool = False) -> Any:
        """Perplexity of ``text`` (tokenized without BOS) over consecutive windows of
        ``window`` tokens, llama.cpp's definition (``ember_session_perplexity``).

        Args:
            text: the text.
            window: tokens per window (at most the session's ``n_ctx``).
            return_count: return ``(perplexity, scored_tokens)`` instead of a float.
        """
        b = _cstr(text, "text")
        w = _uint(window, "window", minimum=2)
        ppl = c_double()
        scored = c_size_t()
        with self._lock:
            check(lib().ember_session_perplexity(self._raw(), b, w, byref(ppl), byref(scored)))
        return (ppl.value, scored.value) if return_count else ppl.value

    # -- sequences --------------------------------------------------------------------

    def add_sequence(
        self,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        *,
        repeat_last_n: Optional[int] = None,
    ) -> "Sequence":
        """Adds a sequence with its own sampler (``ember_seq_add``); see :class:`Sequence`."""
        s = _sampler(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        return Sequence(self, self.seq_add(s))

    def seq_add(self, sampler: Optional[_ffi.SamplerParams] = None) -> int:
        """Low level ``ember_seq_add``: adds a sequence (``sampler``: an
        :class:`ember.SamplerParams` or ``None`` for defaults) and returns its id."""
        if sampler is not None and not isinstance(sampler, _ffi.SamplerParams):
            raise TypeError("sampler must be an ember.SamplerParams or None")
        seq = c_uint64()
        with self._lock:
            check(
                lib().ember_seq_add(
                    self._raw(), byref(sampler) if sampler is not None else None, byref(seq)
                )
            )
        return seq.value

    def seq_remove(self, seq: int) -> None:
        """Low level ``ember_seq_remove``: removes a sequence, freeing its cache region."""
        with self._lock:
            check(lib().ember_seq_remove(self._raw(), _uint(seq, "seq", 64)))

    def seq_prefill(self, seq: int, tokens: SequenceT[int]) -> int:
        """Low level ``ember_seq_prefill``: feeds prompt tokens to a sequence and returns
        the token it samples next."""
        arr = _token_array(tokens)
        nxt = c_uint32()
        with self._lock:
            check(
                lib().ember_seq_prefill(
                    self._raw(), _uint(seq, "seq", 64), _u32_ptr(arr), len(arr), byref(nxt)
                )
            )
        return nxt.value

    def seq_decode(self, seqs: SequenceT[int]) -> List[int]:
        """Low level ``ember_seq_decode``: one batched step; each sequence feeds the token
        it last sampled and samples the next. Returns the new tokens, one per sequence."""
        if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
            raise TypeError("seqs must be a sequence of sequence ids")
        ids = [
            _uint(s.id if isinstance(s, Sequence) else s, f"seqs[{i}]", 64)
            for i, s in enumerate(seqs)
        ]
        if not ids:
            return []
        c_ids = (c_uint64 * len(ids))(*ids)
        nxt = (c_uint32 * len(ids))()
        with self._lock:
            check(lib().ember_seq_decode(self._raw(), c_ids, len(ids), nxt))
        return list(nxt)

    def decode(self, seqs: SequenceT["Sequence"]) -> List[int]:
        """One batched decode step over :class:`Sequence` objects (or ids); see
        :meth:`seq_decode`."""
        return self.seq_decode(seqs)  # type: ignore[arg-type]

    # -- adapters ---------------------------------------------------------------------

    def attach_adapter(self, adapter: "Adapter", name: Optional[str] = None) -> int:
        """Attaches a LoRA adapter (a copy of its weights goes to the device) and returns
        its id in this session, for ``generate(adapter=...)`` or
        :meth:`Sequence.set_adapter`."""
        if not isinstance(adapter, Adapter):
            raise TypeError("adapter must be an ember.Adapter")
        b_name = _cstr(name, "name", allow_none=True)
        out = c_int32()
        with self._lock:
            check(
                lib().ember_session_attach_adapter(self._raw(), adapter._raw(), b_name, byref(out))
            )
        return out.value

    def detach_adapter(self, adapter_id: int) -> None:
        """Detaches adapter ``adapter_id``; sequences using it continue with the base."""
        with self._lock:
            check(
                lib().ember_session_detach_adapter(self._raw(), _uint(adapter_id, "adapter_id", 31))
            )

    def replace_adapter(self, adapter_id: int, adapter: "Adapter") -> None:
        """Hot-swaps the weights of attached adapter ``adapter_id`` for ``adapter``'s."""
        if not isinstance(adapter, Adapter):
            raise TypeError("adapter must be an ember.Adapter")
        with self._lock:
            check(
                lib().ember_session_replace_adapter(
                    self._raw(), _uint(adapter_id, "adapter_id", 31), adapter._raw()
                )
            )

    def set_adapter_scale(self, adapter_id: int, scale: float) -> None:
        """Sets attached adapter ``adapter_id``'s strength (1 = as trained, 0 = off)."""
        with self._lock:
            check(
                lib().ember_session_set_adapter_scale(
                    self._raw(), _uint(adapter_id, "adapter_id", 31), _float(scale, "scale")
                )
            )

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self._n_ctx}"
        return f"<ember.Session {state}>"


class Sequence:
    """One sequence of a :class:`Session` with its own sampler (the ``ember_seq_*`` API).

    Typical use: ``first = seq.prefill(prompt_ids)``, then ``seq.decode()`` (or
    ``session.decode([s1, s2, ...])`` for a batched step) returns each next token.
    :meth:`remove` (or leaving a ``with`` block) frees its cache region.
    """

    def __init__(self, session: Session, seq_id: int) -> None:
        self.session = session
        """The session the sequence lives in."""
        self.id: Optional[int] = seq_id
        """The sequence id (``None`` once removed)."""

    def _id(self) -> int:
        if self.id is None:
            raise EmberError(Status.INVALID_ARGUMENT, "this Sequence was removed")
        return self.id

    def prefill(self, tokens: SequenceT[int]) -> int:
        """Feeds prompt tokens and returns the sampled next token."""
        return self.session.seq_prefill(self._id(), tokens)

    def decode(self) -> int:
        """Feeds the last sampled token and returns the next one."""
        return self.session.seq_decode([self._id()])[0]

    def set_adapter(self, adapter_id: Optional[int], scale: float = 1.0) -> None:
        """Chooses this sequence's adapter (an attached id, or ``None`` for the base
        model) and strength for the tokens it processes from now on."""
        a = -1 if adapter_id is None else _uint(adapter_id, "adapter_id", 31)
        with self.session._lock:
            check(
                lib().ember_seq_set_adapter(
                    self.session._raw(), self._id(), a, _float(scale, "scale")
                )
            )

    def remove(self) -> None:
        """Removes the sequence (idempotent; nothing happens once the session is closed)."""
        sid, self.id = self.id, None
        if sid is not None and not self.session.closed:
            self.session.seq_remove(sid)

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<ember.Sequence id={self.id}>"


class Stream(Iterator[str]):
    """An iterator of text pieces from :meth:`Session.stream`.

    After the iteration ends, :attr:`result` holds the :class:`Generation`. :meth:`close`
    stops early (``result.stop_reason`` is then ``StopReason.CALLBACK``) and frees the
    sequence slot; a ``with`` block closes it on exit.
    """

    def __init__(
        self,
        session: Session,
        prompt: Union[str, List[int]],
        sampler: _ffi.SamplerParams,
        stops: List[str],
        *,
        max_tokens: int,
        chat: bool,
        adapter: Optional[int],
        adapter_scale: float,
    ) -> None:
        self.result: Optional[Generation] = None
        """The :class:`Generation`, once the stream is finished."""
        self._gen = self._run(
            session, prompt, sampler, stops, max_tokens, chat, adapter, adapter_scale
        )

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stops the generation (if still running) and frees its sequence."""
        self._gen.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The whole text, running the stream to its end if needed."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.text

    def _run(
        self,
        session: Session,
        prompt: Union[str, List[int]],
        sampler: _ffi.SamplerParams,
        stops: List[str],
        max_tokens: int,
        chat: bool,
        adapter: Optional[int],
        adapter_scale: float,
    ) -> Generator[str, None, None]:
        model = session._model
        mh = model._handle()
        if isinstance(prompt, str):
            text = prompt
            if chat:
                text = model._apply_chat_template(mh, [{"role": "user", "content": prompt}], True)
            ids = model._tokenize(mh, text, True, True)
            if not ids:
                raise EmberError(Status.INVALID_ARGUMENT, "the prompt is empty")
        else:
            ids = prompt
        anchor_ids, anchor_text = model._stream_anchor(mh)
        L = lib()

        tokens: List[int] = []
        emitted = ""  # text handed out so far
        full = ""  # stable text produced so far (emitted + held back for stop strings)
        pending: List[int] = []  # tokens whose text is not yet stable (incomplete UTF-8)
        pending_done = ""  # stable text of `pending` already appended to `full`
        reason = StopReason.LENGTH
        t_prefill = t_decode = 0.0

        def pending_text(final: bool) -> str:
            """New stable text of `pending` (all of it when `final`)."""
            nonlocal pending, pending_done
            arr = _token_array(anchor_ids + pending)
            t = model._detokenize(mh, arr, True)
            if anchor_text and t.startswith(anchor_text):
                t = t[len(anchor_text) :]
            elif anchor_ids:
                t = model._detokenize(mh, _token_array(pending), True)
            stable = t if final else t.rstrip("\ufffd")
            new = stable[len(pending_done) :] if stable.startswith(pending_done) else ""
            if stable == t:
                pending, pending_done = [], ""
            else:
                pending_done = stable
            return new

        def holdback(s: str) -> int:
            """Length of the longest suffix of `s` that starts some stop string."""
            best = 0
            for st in stops:
                for k in range(min(len(st) - 1, len(s)), best, -1):
                    if s.endswith(st[:k]):
                        best = k
                        break
            return best

        seq = session.seq_add(sampler)
        t1 = time.perf_counter()
        try:
            if adapter is not None:
                with session._lock:
                    check(L.ember_seq_set_adapter(session._raw(), seq, adapter, adapter_scale))
            t0 = time.perf_counter()
            t = session.seq_prefill(seq, ids)
            t_prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            n_fed = len(ids)
            while len(tokens) < max_tokens:
                if L.ember_token_is_eog(mh, t):
                    reason = StopReason.EOS
                    break
                tokens.append(t)
                pending.append(t)
                full += pending_text(False)
                cut = -1
                for st in stops:
                    pos = full.find(st)
                    if pos >= 0 and (cut < 0 or pos < cut):
                        cut = pos
                if cut >= 0:
                    full = full[:cut]
                    if len(full) > len(emitted):
                        piece, emitted = full[len(emitted) :], full
                        yield piece.replace("\0", " ")
                    reason = StopReason.STRING
                    break
                ready = len(full) - holdback(full)
                if ready > len(emitted):
                    piece, emitted = full[len(emitted) : ready], full[:ready]
                    yield piece.replace("\0", " ")
                if len(tokens) >= max_tokens:
                    break
                if n_fed + 1 >= session.n_ctx:
                    reason = StopReason.CONTEXT
                    break
                t = session.seq_decode([seq])[0]
                n_fed += 1
            if reason != StopReason.STRING:
                if pending:
                    full += pending_text(True)
                if len(full) > len(emitted):
                    piece, emitted = full[len(emitted) :], full
                    yield piece.replace("\0", " ")
        except GeneratorExit:
            reason = StopReason.CALLBACK
            raise
        finally:
            t_decode = time.perf_counter() - t1
            if not session.closed:
                try:
                    session.seq_remove(seq)
                except EmberError:
                    pass
            self.result = Generation(
                text=(
                    emitted if reason in (StopReason.CALLBACK, StopReason.STRING) else full
                ).replace("\0", " "),
                tokens=tokens,
                n_prompt_tokens=len(ids),
                stop_reason=reason,
                prefill_tok_s=len(ids) / max(t_prefill, 1e-9),
                decode_tok_s=max(len(tokens) - 1, 0) / max(t_decode, 1e-9),
            )


class Adapter(_Handle):
    """A LoRA adapter in host memory (``ember_adapter``), loaded from a PEFT directory
    (``adapter_config.json`` + ``adapter_model.safetensors``) and checked against ``model``.

    Attach it to sessions with :meth:`Session.attach_adapter` (they keep their own copy,
    so the adapter may be closed afterwards).
    """

    _free_name = "ember_adapter_free"
    _kind = "Adapter"

    def __init__(self, model: Model, path: PathLike) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be an ember.Model, not {type(model).__name__}")
        b = _path(path)
        out = c_void_p()
        check(lib().ember_adapter_load(model._raw(), b, byref(out)))
        self._ptr = out.value

    @classmethod
    def _wrap(cls, ptr: Optional[int]) -> "Adapter":
        a = cls.__new__(cls)
        a._ptr = ptr
        return a

    @property
    def info(self) -> Dict[str, Any]:
        """The adapter's description: rank, alpha, targets, layers, parameter count, base."""
        out = c_void_p()
        check(lib().ember_adapter_info_json(self._raw(), byref(out)))
        return json.loads(take_string(out))

    def save(self, model: Model, path: PathLike) -> None:
        """Saves in the PEFT layout (atomically, file by file), recording ``model``'s
        identity so that loading it on another base fails."""
        if not isinstance(model, Model):
            raise TypeError("model must be an ember.Model")
        check(lib().ember_adapter_save(self._raw(), model._raw(), _path(path)))

    @classmethod
    def combine(
        cls, adapters: SequenceT["Adapter"], weights: Optional[SequenceT[float]] = None
    ) -> "Adapter":
        """Task arithmetic: one adapter applying ``sum_i weights[i] * adapters[i]`` (ranks
        concatenate, nothing is approximated). ``weights`` defaults to all 1."""
        ptrs, w, n = _adapter_array(adapters, weights)
        out = c_void_p()
        check(lib().ember_adapter_combine(ptrs, w, n, byref(out)))
        return cls._wrap(out.value)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

#: LoRA target names (``TrainParams.targets``) -> ``EMBER_TARGET_*`` bits.
_TARGET_BITS = {
    "q": _ffi.TARGET_Q,
    "k": _ffi.TARGET_K,
    "v": _ffi.TARGET_V,
    "o": _ffi.TARGET_O,
    "gate": _ffi.TARGET_GATE,
    "up": _ffi.TARGET_UP,
    "down": _ffi.TARGET_DOWN,
}

_SCHEDULES = {
    "constant": LrSchedule.CONSTANT,
    "cosine": LrSchedule.COSINE,
    "warmup_constant": LrSchedule.WARMUP_CONSTANT,
}


def _target_bits(targets: Any) -> int:
    """``EMBER_TARGET_*`` bits of ``targets`` (0 means every projection)."""
    if targets is None or (isinstance(targets, str) and targets.lower() == "all"):
        return 0
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, bytes) or not isinstance(targets, Iterable):
        raise TypeError('targets must be "all", a target name or a list of names')
    bits = 0
    for i, t in enumerate(targets):
        if not isinstance(t, str):
            raise TypeError(f"targets[{i}] must be a str, not {type(t).__name__}")
        key = t.lower()
        if key.endswith("_proj"):  # PEFT's module names: q_proj, gate_proj, ...
            key = key[: -len("_proj")]
        if key == "all":
            return 0
        if key not in _TARGET_BITS:
            raise ValueError(
                f"unknown LoRA target {t!r}: use {', '.join(_TARGET_BITS)} or 'all'"
            )
        bits |= _TARGET_BITS[key]
    if bits == 0:
        raise ValueError('targets is empty: name at least one projection, or "all"')
    return bits


def _schedule(value: Any) -> LrSchedule:
    if isinstance(value, LrSchedule):
        return value
    if not isinstance(value, str):
        raise TypeError(f"schedule must be a str, not {type(value).__name__}")
    key = value.lower().replace("-", "_")
    if key not in _SCHEDULES:
        raise ValueError(f"unknown schedule {value!r}: use {', '.join(_SCHEDULES)}")
    return _SCHEDULES[key]


@dataclass
class TrainParams:
    """What a :class:`Trainer` trains and how (``ember_train_params``).

    The defaults are the library's (``ember_train_default_params()``): LoRA of rank 8 on
    every projection, 256-token sequences, AdamW at 1e-3 with clipping at 1, a cosine
    schedule over 100 steps with 5 warmup steps.
    """

    lora_rank: int = 8
    """LoRA rank (0: no LoRA)."""
    lora_alpha: float = 0.0
    """LoRA alpha (0: twice the rank)."""
    rslora: bool = False
    """Scale by alpha / sqrt(rank) instead of alpha / rank."""
    targets: Union[str, SequenceT[str], None] = "all"
    """The projections LoRA adapts: ``"all"`` (or ``None``), or names out of ``"q"``,
    ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``, ``"down"`` (PEFT's ``"q_proj"`` etc.
    work too)."""
    prompt_tokens: int = 0
    """Train a soft prompt of this many virtual tokens (0: none)."""
    prefix_tokens: int = 0
    """Train a prefix of this many virtual tokens (0: none; not with a soft prompt)."""
    init_adapter: Union["Adapter", str, "os.PathLike[str]", None] = None
    """Continue training this LoRA adapter (an :class:`Adapter`, or the directory of one)
    instead of a fresh one (its rank, alpha and targets then apply)."""
    seq_len: int = 256
    """Longest sequence in tokens, virtual tokens included (a multiple of 32); longer
    records are truncated."""
    lr: float = 1e-3
    """Base learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm (0: off)."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Union[str, LrSchedule] = "cosine"
    """``"constant"``, ``"cosine"`` (warmup, then cosine decay to 0 at ``total_steps``) or
    ``"warmup_constant"`` (warmup, then constant)."""
    warmup: int = 5
    """Warmup steps."""
    total_steps: int = 100
    """Steps of the whole run (for the cosine schedule)."""
    seed: int = 0
    """Seed of the initialization and of the shuffling of :meth:`Trainer.train_file`."""
    distill_weight: float = 1.0
    """Weight of a distilled token's term: records with ``"distill": true`` learn the frozen
    base model's next-token distribution (KL divergence) instead of their own tokens, which
    keeps what the base knows while new data is learned."""
    lora_experts: int = 0
    """Train a mixture of this many LoRA experts (2..32, each of ``lora_rank``) behind a
    trainable router on every adapted projection instead of one LoRA pair (0: plain LoRA)."""
    lora_top_k: int = 2
    """Experts each token uses in a mixture."""
    switch_gates: bool = False
    """Keep the chosen experts' softmax-over-all gates (Switch Transformer, for top-1)
    instead of renormalizing them to sum to 1."""
    balance_loss: float = 0.01
    """Weight alpha of a mixture's load-balancing loss (``alpha * E * sum_e f_e P_e`` per
    adapted projection)."""
    z_loss: float = 0.0
    """Weight of a mixture's router z-loss (mean squared log-sum-exp of router logits)."""

    def _to_c(self, init_adapter: Optional[int]) -> _ffi.TrainParamsStruct:
        p = lib().ember_train_default_params()
        p.lora_rank = _uint(self.lora_rank, "lora_rank")
        p.lora_alpha = _float(self.lora_alpha, "lora_alpha")
        p.rslora = _bool(self.rslora, "rslora")
        p.lora_targets = _target_bits(self.targets)
        p.prompt_tokens = _uint(self.prompt_tokens, "prompt_tokens")
        p.prefix_tokens = _uint(self.prefix_tokens, "prefix_tokens")
        p.init_adapter = init_adapter
        p.seq_len = _uint(self.seq_len, "seq_len")
        p.lr = _float(self.lr, "lr")
        p.weight_decay = _float(self.weight_decay, "weight_decay")
        p.max_grad_norm = _float(self.max_grad_norm, "max_grad_norm")
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
            raise TypeError("betas must be a pair of numbers (beta1, beta2)")
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values")
        p.beta1 = _float(betas[0], "betas[0]")
        p.beta2 = _float(betas[1], "betas[1]")
        p.eps = _float(self.eps, "eps")
        p.schedule = int(_schedule(self.schedule))
        p.warmup_steps = _uint(self.warmup, "warmup")
        p.total_steps = _uint(self.total_steps, "total_steps")
        p.seed = _uint(self.seed, "seed", 64)
        p.distill_weight = _float(self.distill_weight, "distill_weight")
        p.lora_experts = _uint(self.lora_experts, "lora_experts")
        p.lora_top_k = _uint(self.lora_top_k, "lora_top_k")
        p.switch_gates = _bool(self.switch_gates, "switch_gates")
        p.balance_loss = _float(self.balance_loss, "balance_loss")
        p.z_loss = _float(self.z_loss, "z_loss")
        return p


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (``ember_step_result``)."""

    step: int
    """Updates the trainer has applied so far (skipped steps not counted)."""
    loss: float
    """Mean loss over the scored tokens, before the update."""
    grad_norm: float
    """Global gradient norm, before clipping."""
    lr: float
    """Learning rate used."""
    tokens: int
    """Tokens scored."""
    skipped: bool
    """The loss or a gradient was not finite: the update was skipped, nothing changed."""
    seconds: float
    """Seconds the step took."""
    aux_loss: float = 0.0
    """A mixture of LoRA experts' auxiliary losses (load balancing and z-loss), trained
    beside ``loss``; 0 otherwise."""

    @classmethod
    def _from(cls, r: _ffi.StepResultStruct) -> "StepResult":
        return cls(
            step=int(r.step),
            loss=float(r.loss),
            grad_norm=float(r.grad_norm),
            lr=float(r.lr),
            tokens=int(r.tokens),
            skipped=bool(r.skipped),
            seconds=float(r.seconds),
            aux_loss=float(r.aux_loss),
        )


#: Training records: one dict, or a list of them.
_Records = Union[Mapping[str, Any], SequenceT[Mapping[str, Any]]]


def _jsonl(examples: Any) -> bytes:
    """JSONL bytes of training records (a dict, or a list of dicts)."""
    if isinstance(examples, Mapping):
        examples = [examples]
    elif isinstance(examples, (str, bytes)) or not isinstance(examples, Iterable):
        raise TypeError(
            "examples must be a dict or a list of dicts such as {'text': ...}, "
            "{'prompt': ..., 'completion': ...} or {'messages': [...]}"
        )
    lines = []
    for i, r in enumerate(examples):
        if not isinstance(r, Mapping):
            raise TypeError(f"examples[{i}] must be a dict, not {type(r).__name__}")
        try:
            # ASCII JSON: no NUL can reach the C string, no encoding can fail.
            lines.append(json.dumps(r, ensure_ascii=True, allow_nan=False))
        except TypeError as e:
            raise TypeError(f"examples[{i}] is not JSON-serializable: {e}") from None
        except ValueError as e:
            raise ValueError(f"examples[{i}] is not valid JSON: {e}") from None
    return "\n".join(lines).encode("ascii")


class Trainer(_Handle):
    """Trains an adapter of a model on its GPU (``ember_trainer``): a LoRA adapter, a soft
    prompt or a prefix; the model's weights stay frozen in their stored format.

    Use one trainer from one thread at a time (calls are serialized by a lock); the model
    may serve sessions meanwhile, and a snapshot of the LoRA (:meth:`adapter`) can be
    attached to them while training goes on.

    Args:
        model: the :class:`Model` to train an adapter for.
        params: a :class:`TrainParams`; keyword arguments (its field names) override its
            fields, or give them when ``params`` is ``None``: ``Trainer(model,
            lora_rank=4, targets=["q", "v"], seq_len=64, lr=1e-2)``.

    Raises:
        EmberError: ``Status.INVALID_ARGUMENT`` when nothing is to be trained, ``seq_len``
            is not a multiple of 32, a rate is negative, or ``init_adapter`` was made for
            another base model; ``Status.OUT_OF_MEMORY`` when the buffers do not fit.
        TypeError / ValueError: a parameter of the wrong type, an unknown target or
            schedule name.
    """

    _free_name = "ember_trainer_free"
    _kind = "Trainer"

    def __init__(self, model: Model, params: Optional[TrainParams] = None, **kw: Any) -> None:
        self._lock = threading.RLock()
        if not isinstance(model, Model):
            raise TypeError(f"model must be an ember.Model, not {type(model).__name__}")
        if params is None:
            params = TrainParams(**kw)
        elif not isinstance(params, TrainParams):
            raise TypeError(f"params must be an ember.TrainParams, not {type(params).__name__}")
        elif kw:
            params = dataclasses.replace(params, **kw)
        init = params.init_adapter
        owned: Optional[Adapter] = None
        if init is not None and not isinstance(init, Adapter):
            owned = Adapter(model, init)  # type: ignore[arg-type]
            init = owned
        try:
            p = params._to_c(init._raw() if init is not None else None)
            out = c_void_p()
            check(lib().ember_trainer_create(model._raw(), byref(p), byref(out)))
        finally:
            if owned is not None:
                owned.close()  # the trainer took a copy
        self._ptr = out.value
        self._model = model
        self._params = params

    @property
    def model(self) -> Model:
        """The model being taught."""
        return self._model

    @property
    def params(self) -> TrainParams:
        """The parameters the trainer was made with."""
        return self._params

    def step(self, examples: "_Records") -> StepResult:
        """One optimizer step on ``examples`` (``ember_trainer_step``): all of them form one
        batch, their gradients accumulate into one update.

        Args:
            examples: a record or a list of records, each ``{"text": ...}`` (every token
                scored), ``{"prompt": ..., "completion": ...}`` (the completion and an
                end-of-sequence token scored) or ``{"messages": [{"role", "content"},
                ...]}`` (rendered with the model's chat template; the assistant turns
                scored).

        Raises:
            EmberError: ``Status.INVALID_ARGUMENT`` for a malformed record (the message
                names its line), an empty list, or records with nothing to score.
        """
        data = _jsonl(examples)
        r = _ffi.StepResultStruct()
        r.struct_size = ctypes.sizeof(r)
        with self._lock:
            check(lib().ember_trainer_step(self._raw(), data, byref(r)))
        return StepResult._from(r)

    def step_tokens(
        self,
        sequences: SequenceT[SequenceT[int]],
        loss_mask: Optional[SequenceT[SequenceT[Any]]] = None,
    ) -> StepResult:
        """One optimizer step on token sequences (``ember_trainer_step_tokens``).

        Args:
            sequences: a list of token-id lists (one batch).
            loss_mask: ``None`` (every token scored) or one list per sequence, as long as
                it, true where the token is scored (predicted from the ones before it).
        """
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            raise TypeError("sequences must be a list of token-id lists")
        seqs = [_token_array(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
        flat = _token_array([])
        for a in seqs:
            flat.extend(a)
        n = len(seqs)
        lengths = (c_size_t * max(1, n))(*[len(a) for a in seqs])
        mask = None
        if loss_mask is not None:
            if isinstance(loss_mask, (str, bytes)) or not isinstance(loss_mask, Iterable):
                raise TypeError("loss_mask must be None or a list of lists of bools")
            masks = list(loss_mask)
            if len(masks) != n:
                raise ValueError(f"loss_mask has {len(masks)} lists for {n} sequences")
            bits: List[int] = []
            for i, (m, a) in enumerate(zip(masks, seqs)):
                if isinstance(m, (str, bytes)) or not isinstance(m, Iterable):
                    raise TypeError(f"loss_mask[{i}] must be a list of bools")
                row = [1 if _mask_bit(b, f"loss_mask[{i}]") else 0 for b in m]
                if len(row) != len(a):
                    raise ValueError(
                        f"loss_mask[{i}] has {len(row)} entries for {len(a)} tokens"
                    )
                bits += row
            mask = (ctypes.c_uint8 * max(1, len(bits)))(*bits)
        r = _ffi.StepResultStruct()
        r.struct_size = ctypes.sizeof(r)
        with self._lock:
            check(
                lib().ember_trainer_step_tokens(
                    self._raw(), _u32_ptr(flat), mask, lengths, n, byref(r)
                )
            )
        return StepResult._from(r)

    def train_file(
        self,
        path: PathLike,
        steps: int,
        batch_size: int = 8,
        callback: Optional[Callable[[int, int, StepResult], Any]] = None,
    ) -> float:
        """Trains ``steps`` optimizer steps on a file (``ember_trainer_train_file``): JSONL
        records as in :meth:`step`, or plain text cut into ``seq_len``-token pieces, in
        batches of ``batch_size`` sequences, reshuffled every epoch by the seed.

        Args:
            path: the data file.
            steps: optimizer steps to run.
            batch_size: sequences per step.
            callback: optional ``callback(step, total, result)`` called after every step
                (``step`` counts this call's steps, 1 to ``total``; ``result`` is the
                :class:`StepResult`). Returning ``False`` stops the training: the steps
                done are kept, and :class:`EmberError` with ``Status.ABORTED`` is raised
                (as the C call returns ``EMBER_ABORTED``). An exception it raises stops the
                training too and is re-raised here.

        Returns:
            The loss of the last step.
        """
        b = _path(path)
        n_steps = _uint(steps, "steps")
        bs = _uint(batch_size, "batch_size")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        trap = _Trap()

        def tramp(step: int, total: int, res: Any, _ud: Optional[int]) -> bool:
            if trap.exc is not None:
                return False
            try:
                result = StepResult._from(res.contents)
                r = callback(int(step), int(total), result)  # type: ignore[misc]
                return True if r is None else bool(r)
            except BaseException as e:  # noqa: BLE001 - re-raised after the C call
                trap.exc = e
                return False

        # The ctypes trampoline lives in this frame until the C call has returned.
        cb = _ffi.TRAIN_CALLBACK(tramp) if callback is not None else _ffi.TRAIN_CALLBACK()
        final = c_double(float("nan"))
        with self._lock:
            st = lib().ember_trainer_train_file(
                self._raw(), b, n_steps, bs, cb, None, byref(final)
            )
            trap.reraise()
            check(st)
        return final.value

    def evaluate(self, examples: "_Records") -> float:
        """Mean loss of ``examples`` (records as in :meth:`step`) with the current
        parameters; nothing is updated."""
        data = _jsonl(examples)
        loss = c_double()
        with self._lock:
            check(lib().ember_trainer_evaluate(self._raw(), data, byref(loss)))
        return loss.value

    def adapter(self) -> Adapter:
        """A snapshot of the trained LoRA as an :class:`Adapter`: attach it to sessions
        (or hot-swap it in with :meth:`Session.replace_adapter`) while training goes on.

        Raises:
            EmberError: ``Status.UNSUPPORTED`` when the trainer trains no LoRA.
        """
        out = c_void_p()
        with self._lock:
            check(lib().ember_trainer_get_adapter(self._raw(), byref(out)))
        return Adapter._wrap(out.value)

    def save(self, path: PathLike) -> None:
        """Saves what is trained to directory ``path`` in the PEFT layout, recording the
        base model (a LoRA loads back with :class:`Adapter`). One trained part goes to
        ``path`` itself; a LoRA together with a soft prompt or prefix goes to ``path/lora``
        and ``path/prompt`` or ``path/prefix``. Every file is written atomically."""
        b = _path(path)
        with self._lock:
            check(lib().ember_trainer_save(self._raw(), b))

    @property
    def info(self) -> Dict[str, Any]:
        """The trainer's description (``ember_trainer_info_json``): ``trainable_params``,
        ``steps``, ``config``, ``virtual_tokens``, ``device_bytes``, ..."""
        out = c_void_p()
        with self._lock:
            check(lib().ember_trainer_info_json(self._raw(), byref(out)))
        return json.loads(take_string(out))

    @property
    def steps(self) -> int:
        """Optimizer updates applied so far."""
        return int(self.info["steps"])

    def __repr__(self) -> str:
        if self.closed:
            return "<ember.Trainer closed>"
        try:
            i = self.info
            return f"<ember.Trainer params={i['trainable_params']} steps={i['steps']}>"
        except EmberError:
            return "<ember.Trainer>"


def _mask_bit(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    try:
        import numpy as np

        if isinstance(v, (np.bool_, np.integer)) and int(v) in (0, 1):
            return bool(v)
    except ImportError:
        pass
    raise TypeError(f"{what} entries must be bools (or 0/1), not {v!r}")


class Learner(_Handle):
    """Continual learning into a versioned adapter store (``ember_learner``): examples are
    added as they come (kept on disk until an update), updates are regularized (replay of
    past examples, an L2 or EWC pull toward the previous version, an optional EMA) and
    gated (kept only if the new-task probes improve and the retained probes do not worsen
    by more than a threshold; otherwise recorded and rolled back), and every kept update is
    a version that can be rolled back to.

    Args:
        model: the base :class:`Model`.
        store: the store directory (created when missing or empty).
        **params: fields of ``ember_learner_params``: ``lora_rank``, ``lora_alpha``,
            ``targets``, ``seq_len``, ``lr``, ``steps_per_update``, ``batch_size``,
            ``update_every``, ``replay_ratio``, ``replay_capacity``, ``replay_distill``,
            ``l2``, ``ewc``, ``ema``, ``gate``, ``min_new_gain``, ``max_retained_rise``,
            ``probe_limit``, ``warmup_steps``, ``max_answer_drop``, ``answer_tokens``,
            ``distill_weight``, ``seed``.

    Raises:
        EmberError: ``Status.INVALID_ARGUMENT`` for bad parameters or a store of another
            base model; an error naming the file for a damaged store.
    """

    _free_name = "ember_learner_free"
    _kind = "Learner"

    def __init__(self, model: Model, store: PathLike, **params: Any) -> None:
        self._lock = threading.RLock()
        if not isinstance(model, Model):
            raise TypeError(f"model must be an ember.Model, not {type(model).__name__}")
        p = lib().ember_learner_default_params()
        for k, v in params.items():
            if k == "targets":
                p.lora_targets = _target_bits(v)
            elif k in ("replay_distill", "gate"):
                setattr(p, k, _bool(v, k))
            elif k in ("lora_alpha", "lr", "replay_ratio", "l2", "ewc", "ema", "min_new_gain", "max_retained_rise",
                       "max_answer_drop", "distill_weight"):
                setattr(p, k, _float(v, k))
            elif k in (
                "lora_rank",
                "seq_len",
                "steps_per_update",
                "batch_size",
                "update_every",
                "replay_capacity",
                "probe_limit",
                "warmup_steps",
                "answer_tokens",
            ):
                setattr(p, k, _uint(v, k))
            elif k == "seed":
                p.seed = _uint(v, k, 64)
            else:
                raise TypeError(f"unknown learner parameter {k!r}")
        out = c_void_p()
        check(lib().ember_learner_open(model._raw(), _path(store, "store"), byref(p), byref(out)))
        self._ptr = out.value
        self._model = model

    def add(self, examples: "_Records") -> Optional[Dict[str, Any]]:
        """Adds records (``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``);
        returns the update's report when the ``update_every`` policy ran one, else None."""
        data = _jsonl(examples)
        out = c_void_p()
        with self._lock:
            check(lib().ember_learner_add(self._raw(), data, byref(out)))
        return json.loads(take_string(out)) if out.value else None

    def set_probes(self, new_task: "_Records" = (), retained: "_Records" = ()) -> None:
        """Sets the evaluation gate's probe sets (records)."""
        n = _jsonl(new_task) if new_task else None
        r = _jsonl(retained) if retained else None
        with self._lock:
            check(lib().ember_learner_set_probes(self._raw(), n, r))

    def set_answer_probes(self, new_task: SequenceT[Dict[str, str]] = (),
                          retained: SequenceT[Dict[str, str]] = ()) -> None:
        """Sets exact-match probes of the gate: dicts with ``"question"`` (asked through
        the chat template) or ``"prompt"`` (raw text), and ``"expect"``, the text the greedy
        answer must contain. An update is kept only if no fewer new-task answers are right,
        and the retained answers' accuracy falls by at most ``max_answer_drop``."""
        def lines(probes: SequenceT[Dict[str, str]]) -> Optional[bytes]:
            if not probes:
                return None
            return "".join(json.dumps(dict(p)) + "\n" for p in probes).encode()
        with self._lock:
            check(lib().ember_learner_set_answer_probes(self._raw(), lines(new_task), lines(retained)))

    def retain(self, examples: "_Records") -> int:
        """Adds anchors: records of text whose base-model behaviour must be kept (general
        text), replayed distilled against the frozen base in every later update. Text
        already held is skipped; returns how many were new."""
        data = _jsonl(examples)
        added = c_uint32()
        with self._lock:
            check(lib().ember_learner_retain(self._raw(), data, byref(added)))
        return added.value

    def update(self) -> Dict[str, Any]:
        """Runs an update on the pending examples now; returns its report (``version``,
        ``kept``, ``reason``, losses before and after, ``secs``)."""
        out = c_void_p()
        with self._lock:
            check(lib().ember_learner_update(self._raw(), byref(out)))
        return json.loads(take_string(out))

    def rollback(self, version: int) -> None:
        """Makes ``version`` the head again and continues from it."""
        with self._lock:
            check(lib().ember_learner_rollback(self._raw(), _uint(version, "version")))

    def adapter(self) -> Adapter:
        """The current adapter (the head after an update), to attach to sessions."""
        out = c_void_p()
        with self._lock:
            check(lib().ember_learner_get_adapter(self._raw(), byref(out)))
        return Adapter._wrap(out.value)

    def start_background(self) -> None:
        """Runs updates on a thread of their own: :meth:`add` and :meth:`request_update`
        return at once; :meth:`poll` reports what happened."""
        with self._lock:
            check(lib().ember_learner_start_background(self._raw()))

    def stop_background(self) -> None:
        """Finishes the queued work and returns to synchronous calls."""
        with self._lock:
            check(lib().ember_learner_stop_background(self._raw()))

    def request_update(self) -> None:
        """Queues an update (background mode)."""
        with self._lock:
            check(lib().ember_learner_request_update(self._raw()))

    def wait(self) -> None:
        """Blocks until the queued work is done (background mode)."""
        with self._lock:
            check(lib().ember_learner_wait(self._raw()))

    def poll(self) -> Dict[str, Any]:
        """``busy``, ``published`` (kept updates so far) and the ``events`` since the last
        call (update reports, or ``{"error": ...}``)."""
        out = c_void_p()
        with self._lock:
            check(lib().ember_learner_poll(self._raw(), byref(out)))
        return json.loads(take_string(out))

    @property
    def info(self) -> Dict[str, Any]:
        """``head``, ``background``, every version's metadata, and (not in background mode)
        ``pending``, ``replay`` and ``replay_seen``."""
        out = c_void_p()
        with self._lock:
            check(lib().ember_learner_info_json(self._raw(), byref(out)))
        return json.loads(take_string(out))

