"""ctfs.policy: the embedded access policy (__policy__), evaluated with regopy (rego-cpp)."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

try:
    import ctfs  # noqa: F401
except ImportError:  # run as plain `pytest` without the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctfs.auth import policy
from ctfs.errors import CtfsError, PolicyError
from ctfs.auth.policy import (DEFAULT_POLICY_SOURCE, PolicyDecision, build_input, evaluate,
                         make_policy_field, parse_policy_field)

import regopy  # noqa: E402,F401  (a runtime dependency)

ALLOWED = PolicyDecision(True, "allowed")
DENIED = PolicyDecision(False, "Policy evaluation denied")
UNDEFINED = PolicyDecision(False, "Policy returned undefined")
NOT_BOOL = PolicyDecision(False, "Policy did not return a boolean")
NO_RULE = PolicyDecision(False, "Policy evaluation failed: not a valid rule path")


def pol(body: str) -> str:
    return "package model\n" + body


# --------------------------------------------------------------------------------------
# __policy__ field
# --------------------------------------------------------------------------------------


def test_make_policy_field_matches_reference_bytes() -> None:
    assert make_policy_field(DEFAULT_POLICY_SOURCE) == (
        '{"local":"package model\\nallow = true","remote":"package model\\nallow = true"}')
    assert make_policy_field("package model\nallow := false", "package model\nallow := true") == (
        '{"local":"package model\\nallow := false","remote":"package model\\nallow := true"}')
    # serde_json style: UTF-8 kept raw, quotes/backslashes/control chars escaped
    assert make_policy_field('x "é" \\ \t\x01') == (
        '{"local":"x \\"é\\" \\\\ \\t\\u0001","remote":"package model\\nallow = true"}')


def test_make_then_parse_roundtrip() -> None:
    src = pol('allow if { input.uid == 0 }  # ünïcode')
    assert parse_policy_field(make_policy_field(src, "R")) == {"local": src, "remote": "R"}


@pytest.mark.parametrize("value, message", [
    ('{"local":"a"}', "Failed to parse policy: missing field `remote`"),
    ('{"remote":"a"}', "Failed to parse policy: missing field `local`"),
    ('{}', "Failed to parse policy: missing field `local`"),
    ('{"local":1,"remote":"a"}',
     "Failed to parse policy: invalid type: integer `1`, expected a string"),
    ('{"local":"a","remote":null}',
     "Failed to parse policy: invalid type: null, expected a string"),
    ('{"local":"a","local":"b","remote":"c"}', "Failed to parse policy: duplicate field `local`"),
    ('[1]', "Failed to parse policy: invalid type: sequence, expected struct Policy"),
    ('"x"', 'Failed to parse policy: invalid type: string "x", expected struct Policy'),
])
def test_parse_policy_field_errors(value: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_field(value)
    assert str(info.value) == message
    assert isinstance(info.value, CtfsError)


@pytest.mark.parametrize("value", ["", "not json", '{"local":', "\x00"])
def test_parse_policy_field_not_json(value: str) -> None:
    with pytest.raises(PolicyError, match=r"^Failed to parse policy: "):
        parse_policy_field(value)


def test_parse_policy_field_ignores_unknown_fields_and_accepts_bytes() -> None:
    assert parse_policy_field('{"remote":"r","extra":[1],"local":"l"}') == {
        "local": "l", "remote": "r"}
    assert parse_policy_field(b'{"local":"l","remote":"r"}') == {"local": "l", "remote": "r"}


# --------------------------------------------------------------------------------------
# Reference outcomes (no input document, as the reference evaluates)
# --------------------------------------------------------------------------------------


def test_default_policy_is_allowed_without_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("engine used for the default policy")

    monkeypatch.setattr(policy._WORKER, "evaluate", boom)
    assert evaluate(DEFAULT_POLICY_SOURCE) == ALLOWED
    assert evaluate(DEFAULT_POLICY_SOURCE, build_input(file_name="a", mount_path=None,
                                                       provider=None)) == ALLOWED


def test_anything_but_the_exact_default_goes_through_the_engine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = policy._WORKER.evaluate

    def spy(source: str, *a: object, **k: object) -> PolicyDecision:
        seen.append(source)
        return real(source, *a, **k)

    monkeypatch.setattr(policy._WORKER, "evaluate", spy)
    for src in (DEFAULT_POLICY_SOURCE + "\n", "package model\nallow  = true",
                "package model\nallow = false"):
        evaluate(src)
    assert len(seen) == 3
    assert evaluate(DEFAULT_POLICY_SOURCE + "\n") == ALLOWED
    assert evaluate("package model\nallow = false") == DENIED


@pytest.mark.parametrize("source, expected", [
    (pol("allow = true"), ALLOWED),
    (pol("allow := true"), ALLOWED),
    (pol("default allow := false\nallow if { 1 == 1 }"), ALLOWED),
    (pol("default allow := false\nallow if 1 < 2"), ALLOWED),
    (pol("import rego.v1\nallow if { true }"), ALLOWED),
    (pol("import future.keywords.if\nallow if { true }"), ALLOWED),
    (pol("allow if { time.now_ns() > 0 }"), ALLOWED),
    (pol("allow = false"), DENIED),
    (pol("allow := false"), DENIED),
    (pol("default allow := false\nallow if { 1 == 2 }"), DENIED),
    (pol("allow if { 1 == 2 }"), UNDEFINED),
    (pol("allow if { input.uid == 0 }"), UNDEFINED),  # no input document
    (pol('allow := "true"'), NOT_BOOL),
    (pol("allow := 1"), NOT_BOOL),
    (pol("allow := null"), NOT_BOOL),
    (pol("allow := [true]"), NOT_BOOL),
    (pol('allow := {"a": true}'), NOT_BOOL),
    (pol("allow contains 1 if { true }"), NOT_BOOL),
    ("package foo\nallow := true", NO_RULE),
    ("package model.sub\nallow := true", NO_RULE),
    (pol("foo := true"), NO_RULE),
])
def test_reference_outcomes(source: str, expected: PolicyDecision) -> None:
    assert evaluate(source) == expected


@pytest.mark.parametrize("source", [
    "this is not rego @@@",
    "",
    "package",
    pol("allow := "),
    pol("allow if {"),
    "\n\n   \n",
    "package model\nallow := true\n}}}}",
    "{\"local\": \"package model\"}",
    "allow := true",  # rego-cpp accepts a module with no package; the reference does not
    "# only a comment\nallow := true",
])
def test_parse_errors_deny_with_failed_to_add(source: str) -> None:
    d = evaluate(source)
    assert d.allowed is False
    assert d.reason.startswith("Failed to add policy: "), d.reason
    assert len(d.reason) > len("Failed to add policy: ")


def test_parse_error_message_has_location() -> None:
    d = evaluate("package model\nthis is not rego @@@")
    assert d.reason.startswith("Failed to add policy: policy.rego:2:1: "), d.reason
    assert evaluate("\n  allow := true").reason == (
        "Failed to add policy: policy.rego:2:3: error: expecting `package`")


@pytest.mark.parametrize("source, where", [
    (pol("allow { true }"), "2:7"),
    (pol("allow = true { true }"), "2:14"),
    (pol('deny[msg] { msg := "x" }\nallow := true'), "2:11"),
    (pol("f(x) { x }\nallow := true"), "2:6"),
    (pol("allow if { false } else { true }"), "2:25"),
    (pol("allow if { false } else = true { true }"), "2:32"),
    (pol("import rego.v1\nallow { true }"), "3:7"),
])
def test_v0_syntax_is_refused_like_the_reference(source: str, where: str) -> None:
    # regopy (rego-cpp 1.5.2) ACCEPTS these (allow { true } evaluates to true there); the
    # reference rejects them at parse time, so we refuse them before the engine: deny.
    d = evaluate(source)
    assert d.allowed is False
    assert d.reason.startswith(f"Failed to add policy: policy.rego:{where}: error: "
                               "`if` keyword is required before rule body"), d.reason


@pytest.mark.parametrize("source", [
    pol('import rego.v1\ndefault allow := false\nallow if {\n  input.uid == 0\n}\n'
        'reason := "x" if { not allow }'),
    pol('allowed := {"root", "alice"}\nallow if input.user in allowed'),
    pol("allow if { some x in [1]; x == 1 } else := false"),
    pol('obj := {"a": {"b": 1}}\nallow := obj.a.b == 1'),
    pol('f(x) := {"v": x}\nallow := f(1).v == 1'),
    pol('allow if input.x == {"a": 1}'),
    pol("a := {1} | {2}\nallow := count(a) == 2"),
    pol('# { a brace in a comment\nallow := "{" != "}"'),
    pol("allow := `raw { string` == \"raw { string\""),
    pol("allow := x if { x := true }"),
    pol('deny contains msg if { input.uid != 0; msg := "x" }\nallow if count(deny) == 0'),
])
def test_v1_policies_are_not_mistaken_for_v0(source: str) -> None:
    assert policy._find_v0_body(source) is None
    assert evaluate(source, {"uid": 0, "user": "root", "x": {"a": 1}}) == ALLOWED


@pytest.mark.parametrize("source, fragment", [
    (pol("allow := true\nallow := false"), "complete rules must not produce multiple outputs"),
    (pol("allow := 1/0 == 1"), "divide by zero"),
    (pol('allow := to_number("x") == 1'), ""),
    (pol("allow if { any([true]) }"), "any"),  # deprecated v0 built-in
    (pol("f(x) := y if { y := f(x) }\nallow if { f(1) }"), "Recursion"),
])
def test_evaluation_errors_deny(source: str, fragment: str) -> None:
    d = evaluate(source)
    assert d.allowed is False
    assert d.reason.startswith("Policy evaluation failed: "), d.reason
    assert fragment in d.reason


def test_builtin_error_in_one_body_is_an_error_not_a_silent_skip() -> None:
    # rego-cpp's lenient mode would skip the failing body and allow; regorus halts.
    d = evaluate(pol("allow if { x := 1/0; x > 0 }\nallow := true"))
    assert d.allowed is False and d.reason.startswith("Policy evaluation failed: ")


# --------------------------------------------------------------------------------------
# The policy's own reason
# --------------------------------------------------------------------------------------


def test_reason_rule_is_appended_to_a_denial() -> None:
    assert evaluate(pol('allow := false\nreason := "only on host gpu-1"')) == PolicyDecision(
        False, "Policy evaluation denied: only on host gpu-1")
    assert evaluate(pol('allow if { 1 == 2 }\ndeny_reason := "never"')) == PolicyDecision(
        False, "Policy returned undefined: never")
    assert evaluate(pol('allow := "no"\nreason := {"code": 7}')) == PolicyDecision(
        False, 'Policy did not return a boolean: {"code":7}')


def test_reason_with_input_and_default() -> None:
    src = pol('default allow := false\nallow if input.uid == 0\n'
              'reason := sprintf("uid %d is not root", [input.uid]) if { not allow }')
    assert evaluate(src, {"uid": 1000}) == PolicyDecision(
        False, "Policy evaluation denied: uid 1000 is not root")
    assert evaluate(src, {"uid": 0}) == ALLOWED  # no reason appended to "allowed"


def test_reason_is_sanitised_and_bounded() -> None:
    d = evaluate(pol('allow := false\nreason := concat("", ["a\\nb", "\\u0007", "x"])'))
    assert d.reason == "Policy evaluation denied: a b x"  # \n and BEL -> spaces
    d = evaluate(pol('allow := false\nreason := concat("", [x | some _ in numbers.range(1, 2000); '
                     'x := "y"])'))
    assert d.reason.startswith("Policy evaluation denied: yyy")
    assert len(d.reason) <= len("Policy evaluation denied: ") + policy.MAX_REASON_CHARS + 1


def test_failing_reason_rule_does_not_change_the_decision() -> None:
    assert evaluate(pol("allow := false\nreason := 1/0")) == DENIED


# --------------------------------------------------------------------------------------
# Input document
# --------------------------------------------------------------------------------------


def test_build_input_fields() -> None:
    before = time.time_ns()
    doc = build_input(file_name="model.safetensors", mount_path="/mnt/m", provider="file")
    after = time.time_ns()
    assert doc["file_name"] == "model.safetensors"
    assert doc["mount_path"] == "/mnt/m"
    assert doc["provider"] == "file"
    assert doc["uid"] == os.getuid() and doc["gid"] == os.getgid()
    assert isinstance(doc["hostname"], str) and doc["hostname"]
    assert isinstance(doc["time_ns"], int) and before <= doc["time_ns"] <= after
    assert doc["time_rfc3339"].endswith("+00:00")
    assert isinstance(doc["user"], (str, type(None)))
    json.dumps(doc)  # JSON-able
    assert build_input(file_name="f", mount_path=None, provider=None, uid=1234, gid=5)[
        "uid"] == 1234


def test_uid_policy() -> None:
    src = pol("default allow := false\nallow if input.uid == 0")
    root = build_input(file_name="a", mount_path=None, provider=None, uid=0, gid=0)
    user = build_input(file_name="a", mount_path=None, provider=None, uid=1000, gid=1000)
    assert evaluate(src, root) == ALLOWED
    assert evaluate(src, user) == DENIED
    assert evaluate(src) == DENIED  # reference-style: no input -> default


def test_file_name_glob_and_provider_policy() -> None:
    src = pol('default allow := false\n'
              'allow if {\n'
              '  glob.match("model-*.safetensors", [], input.file_name)\n'
              '  input.provider in {"file", "openbao"}\n'
              '}')
    ok = build_input(file_name="model-00001.safetensors", mount_path="/m", provider="openbao")
    bad_name = build_input(file_name="tokenizer.json", mount_path="/m", provider="openbao")
    bad_prov = build_input(file_name="model-1.safetensors", mount_path="/m", provider="env")
    assert evaluate(src, ok) == ALLOWED
    assert evaluate(src, bad_name) == DENIED
    assert evaluate(src, bad_prov) == DENIED


def test_time_window_policies() -> None:
    doc = build_input(file_name="a", mount_path=None, provider=None)
    now = time.time_ns()
    hour = 3600 * 10**9
    window = pol(f"default allow := false\nallow if {{\n  time.now_ns() >= {now - hour}\n"
                 f"  time.now_ns() < {now + hour}\n}}")
    expired = pol(f"default allow := false\nallow if time.now_ns() < {now - hour}")
    assert evaluate(window) == ALLOWED
    assert evaluate(expired) == DENIED
    # the input's own clock, and its RFC 3339 form, agree with the engine's parser
    src = pol("allow if {\n  time.parse_rfc3339_ns(input.time_rfc3339) == input.time_ns\n"
              "  input.time_ns <= time.now_ns()\n}")
    assert evaluate(src, doc) == ALLOWED


def test_policy_for_reference_keeps_working_with_input() -> None:
    doc = build_input(file_name="a", mount_path="/m", provider="file")
    for src, expected in [(pol("allow := true"), ALLOWED), (pol("allow := false"), DENIED),
                          (pol("allow if { 1 == 2 }"), UNDEFINED)]:
        assert evaluate(src) == evaluate(src, doc) == expected


def test_input_that_is_not_json_denies() -> None:
    d = evaluate(pol("allow := true"), {"x": object()})  # type: ignore[dict-item]
    assert d.allowed is False and d.reason.startswith("Policy evaluation failed: ")
    d = evaluate(pol("allow := true"), {"x": float("nan")})
    assert d.allowed is False


# --------------------------------------------------------------------------------------
# Untrusted policy text: bounded time and memory, odd inputs
# --------------------------------------------------------------------------------------


def test_slow_policy_times_out_and_engine_recovers() -> None:
    slow = pol("allow if { count([1 | some i in numbers.range(1, 5000); "
               "some j in numbers.range(1, 5000)]) > 0 }")
    t0 = time.monotonic()
    d = evaluate(slow, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert d == PolicyDecision(False, "Policy evaluation failed: timed out after 0.5 s")
    assert elapsed < 5
    assert evaluate(pol("allow := true")) == ALLOWED  # a fresh worker took over


def test_memory_hog_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "MAX_WORKER_RSS", 256 << 20)
    hog = pol("allow if { count(numbers.range(1, 200000000)) > 0 }")
    t0 = time.monotonic()
    d = evaluate(hog, timeout=30)
    assert d.allowed is False
    assert d.reason in ("Policy evaluation failed: memory limit exceeded (256 MiB)",
                        "Policy evaluation failed: timed out after 30 s")
    assert time.monotonic() - t0 < 31
    assert evaluate(pol("allow := true")) == ALLOWED


def test_worker_crash_denies_and_recovers() -> None:
    assert evaluate(pol("allow := true")) == ALLOWED
    pid = policy._WORKER.pid
    assert pid is not None
    os.kill(pid, 9)
    d = evaluate(pol("allow := true"))  # the dead worker is noticed and replaced
    assert d == ALLOWED or d.reason.startswith(
        "Policy evaluation failed: policy engine crashed"), d
    assert evaluate(pol("allow := true")) == ALLOWED


@pytest.mark.parametrize("source, fragment", [
    ("package model\x00\nallow := true", "NUL"),
    ("package model\nallow := true\n" + "#" * (policy.MAX_POLICY_CHARS + 1), "too large"),
    ("package model\nallow := \"\ud800\"", "UTF-8"),
])
def test_odd_texts_are_refused(source: str, fragment: str) -> None:
    d = evaluate(source)
    assert d.allowed is False
    assert d.reason.startswith("Failed to add policy: ") and fragment in d.reason


def test_non_string_source_denies() -> None:
    d = evaluate(None)  # type: ignore[arg-type]
    assert d.allowed is False and d.reason.startswith("Failed to add policy: ")


def test_binary_garbage_never_raises() -> None:
    rnd = __import__("random").Random(1234)
    for _ in range(20):
        text = "".join(chr(rnd.randrange(1, 0x2FF)) for _ in range(rnd.randrange(0, 200)))
        d = evaluate(text)
        assert isinstance(d, PolicyDecision) and d.allowed is False


def test_concurrent_evaluations() -> None:
    src = pol("default allow := false\nallow if input.uid == 0")
    results: list[tuple[int, PolicyDecision]] = []
    lock = threading.Lock()

    def run(uid: int) -> None:
        d = evaluate(src, {"uid": uid})
        with lock:
            results.append((uid, d))

    threads = [threading.Thread(target=run, args=(i % 2,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 16
    for uid, d in results:
        assert d == (ALLOWED if uid == 0 else DENIED)


def test_shutdown_engine_then_reuse() -> None:
    policy.shutdown_engine()
    assert policy._WORKER.pid is None
    assert evaluate(pol("allow := true")) == ALLOWED


def test_regopy_outside_the_pinned_range_is_refused_with_the_fix():
    import types

    import regopy.rego_shared

    from ctfs.auth.policy import check_regopy
    assert check_regopy(regopy) is None
    fake = types.SimpleNamespace(__version__="1.6.0", rego_shared=regopy.rego_shared,
                                 Interpreter=regopy.Interpreter)
    assert check_regopy(fake) == ("ctfs needs regopy>=1.5,<1.6 (found regopy 1.6.0); "
                                  "install it with: pip install 'regopy>=1.5,<1.6'")
    fake = types.SimpleNamespace(__version__="1.5.9", rego_shared=types.SimpleNamespace(),
                                 Interpreter=regopy.Interpreter)
    assert check_regopy(fake).startswith("ctfs needs regopy>=1.5,<1.6 (found regopy 1.5.9, without "
                                         "rego_shared.rego, rego_node_get")


def test_reader_without_a_policy_engine_refuses_every_file(tmp_path, monkeypatch):
    """The format layer cannot import the engine; the package root wires it in. Without
    that wiring a reader fails closed (PolicyError), even for the default policy."""
    from safetensors.numpy import save_file

    from ctfs.format import policyfield
    from ctfs.format.keys import KeySet
    from ctfs.format.reader import CryptoFile
    from ctfs.format.writer import encrypt_file
    import numpy as np

    keys = KeySet.generate()
    save_file({"w": np.arange(6, dtype=np.float32)}, str(tmp_path / "p.safetensors"))
    encrypt_file(str(tmp_path / "p.safetensors"), str(tmp_path / "e.safetensors"), keys)
    with CryptoFile(tmp_path / "e.safetensors", keys) as cf:  # wired: the default policy allows
        assert bytes(cf.tensor_bytes("w")) == np.arange(6, dtype=np.float32).tobytes()
    monkeypatch.setattr(policyfield, "_evaluator", None)
    with pytest.raises(PolicyError, match=r"e\.safetensors: no policy engine is installed"):
        CryptoFile(tmp_path / "e.safetensors", keys)
    CryptoFile(tmp_path / "e.safetensors", keys, check_policy=False).close()  # only when asked
