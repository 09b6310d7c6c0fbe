"""The library loads, its versions match, and the ctypes mirror agrees with ember.h."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ember
from ember import _ffi


def test_library_loads_and_versions_match():
    assert ember.abi_version() == ember.ABI_VERSION == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", ember.version())
    assert ember.lib_path()


@pytest.mark.skipif(
    not os.environ.get("EMBER_PY_EXPECT_INSTALLED"), reason="only under scripts/test-python.sh"
)
def test_the_installed_package_is_tested():
    # scripts/test-python.sh installs the package into a venv: make sure that copy is the
    # one under test, not the source tree.
    assert "site-packages" in Path(ember.__file__).parts, ember.__file__


def test_struct_sizes_match_the_library():
    for struct, fn in _ffi._SIZED_DEFAULTS.items():
        assert getattr(_ffi.lib(), fn)().struct_size == ctypes.sizeof(struct), struct.__name__


_C_TYPES = {
    "uint32_t": ctypes.c_uint32,
    "int32_t": ctypes.c_int32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "bool": ctypes.c_bool,
    "const char *": ctypes.c_char_p,
    "void *": ctypes.c_void_p,
    "enum ember_stop_reason": ctypes.c_int,
    "enum ember_lr_schedule": ctypes.c_int,
    "const struct ember_adapter *": ctypes.c_void_p,
    "struct ember_sampler_params": _ffi.SamplerParams,
    "const char *const *": ctypes.POINTER(ctypes.c_char_p),
    "ember_progress_callback": _ffi.PROGRESS_CALLBACK,
    "ember_token_callback": _ffi.TOKEN_CALLBACK,
}

_MIRRORS = {
    "ember_context_params": _ffi.ContextParams,
    "ember_model_params": _ffi.ModelParams,
    "ember_model_info": _ffi.ModelInfoStruct,
    "ember_chat_message": _ffi.ChatMessageStruct,
    "ember_session_params": _ffi.SessionParams,
    "ember_sampler_params": _ffi.SamplerParams,
    "ember_generate_params": _ffi.GenerateParams,
    "ember_generate_result": _ffi.GenerateResult,
    "ember_train_params": _ffi.TrainParamsStruct,
    "ember_step_result": _ffi.StepResultStruct,
    "ember_learner_params": _ffi.LearnerParamsStruct,
}


def _header(repo: Path) -> str:
    h = repo / "capi" / "include" / "ember.h"
    if not h.is_file():
        pytest.skip("ember.h is not available (not a checkout)")
    text = h.read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_every_header_struct_is_mirrored_field_by_field(repo):
    text = _header(repo)
    structs = dict(re.findall(r"typedef struct (\w+) \{(.*?)\} \1;", text, flags=re.S))
    assert set(structs) == set(_MIRRORS), "a struct was added to or removed from ember.h"
    for name, body in structs.items():
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(.*?)\s*\b(\w+)", decl, flags=re.S)
            assert m, decl
            ctype = re.sub(r"\s+", " ", m.group(1)).replace(" *", " *").strip()
            fields.append((m.group(2), ctype))
        mirror = _MIRRORS[name]
        assert [f[0] for f in mirror._fields_] == [f[0] for f in fields], name
        for (fname, ctype), (_, pytype) in zip(fields, mirror._fields_):  # noqa: B905
            assert _C_TYPES[ctype] is pytype, f"{name}.{fname}: {ctype} vs {pytype}"


def test_every_header_function_is_declared(repo):
    text = _header(repo)
    declared = set(re.findall(r"^[A-Za-z_][\w ]*?[\s*](ember_\w+)\(", text, flags=re.M))
    assert len(declared) > 40
    assert declared == set(_ffi._PROTOTYPES)


def test_enums_mirror_the_header(repo):
    text = _header(repo)
    for cname, enum_cls, prefix in [
        ("ember_status", ember.Status, "EMBER_"),
        ("ember_stop_reason", ember.StopReason, "EMBER_STOP_"),
        ("ember_log_level", ember.LogLevel, "EMBER_LOG_"),
        ("ember_lr_schedule", ember.LrSchedule, "EMBER_LR_"),
    ]:
        body = re.search(r"typedef enum %s \{(.*?)\}" % cname, text, flags=re.S).group(1)
        values = {k[len(prefix) :]: int(v) for k, v in re.findall(r"(\w+) = (\d+)", body)}
        assert values == {e.name: e.value for e in enum_cls}, cname
    for s in ember.Status:
        assert ember.status_str(s) == "EMBER_" + s.name


def test_target_bits_mirror_the_header(repo):
    text = _header(repo)
    bits = {k: int(v) for k, v in re.findall(r"#define EMBER_TARGET_(\w+) (\d+)", text)}
    assert bits == {
        name: getattr(_ffi, "TARGET_" + name)
        for name in ["Q", "K", "V", "O", "GATE", "UP", "DOWN"]
    }


def test_callback_prototypes_mirror_the_header(repo):
    text = _header(repo)
    found = re.findall(r"typedef (\w+) \(\*(ember_\w+_callback)\)\((.*?)\);", text)
    mirrors = {
        "ember_log_callback": _ffi.LOG_CALLBACK,
        "ember_progress_callback": _ffi.PROGRESS_CALLBACK,
        "ember_token_callback": _ffi.TOKEN_CALLBACK,
        "ember_train_callback": _ffi.TRAIN_CALLBACK,
    }
    assert {name for _, name, _ in found} == set(mirrors)
    for ret, name, args in found:
        proto = mirrors[name]
        assert proto._restype_ is {"bool": ctypes.c_bool, "void": None}[ret], name
        assert len(proto._argtypes_) == args.count(",") + 1, name


def test_internal_panic_is_a_status_not_a_crash():
    assert _ffi.lib().ember_debug_internal_panic() == ember.Status.INTERNAL
    assert "panic" in _ffi.last_error()


def test_missing_library_gives_ember_error_at_first_use(tmp_path):
    code = (
        "import ember\n"
        "try:\n"
        "    ember.version()\n"
        "except ember.EmberError as e:\n"
        "    print('ERR', e.status.name, e.message)\n"
    )
    env = dict(os.environ, EMBER_LIBRARY=str(tmp_path / "libember-missing.so"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR IO cannot load the Ember library"), r.stdout


def test_context_info_json(ctx):
    info = ctx.info
    assert isinstance(info["adapter"]["name"], str) and info["adapter"]["name"]
    assert "backend" in info["adapter"]
    assert "capabilities" in info
    assert "Context" in repr(ctx)


def test_context_arguments_are_checked():
    with pytest.raises(TypeError):
        ember.Context(backend=3)
    with pytest.raises(ValueError):
        ember.Context(memory_budget=-1)
    with pytest.raises(TypeError):
        ember.Context(disable_f16="yes")
    with pytest.raises(ember.EmberError) as e:
        ember.Context(backend="no-such-backend")
    assert e.value.status == ember.Status.INVALID_ARGUMENT
    assert "no-such-backend" in e.value.message


def test_context_manager_and_idempotent_close():
    with ember.Context() as c:
        assert not c.closed
    assert c.closed
    c.close()
    c.close()
    with pytest.raises(ember.EmberError) as e:
        _ = c.info
    assert e.value.status == ember.Status.INVALID_ARGUMENT


def test_log_callback_receives_messages(tiny_path):
    seen = []
    ember.set_log_callback(lambda level, msg: seen.append((level, msg)))
    try:
        with ember.Context() as c, ember.Model(c, tiny_path):
            pass
    finally:
        ember.set_log_callback(None)
    assert all(isinstance(lv, ember.LogLevel) and isinstance(m, str) for lv, m in seen)
