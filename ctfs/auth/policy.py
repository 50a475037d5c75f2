"""The embedded CryptoTensors access policy (``__policy__``).

A CryptoTensors file carries ``__policy__`` = JSON ``{"local": <Rego>, "remote": <Rego>}``.
Only ``local`` is evaluated, and the decision is the rule ``data.model.allow``:

=====================================  ============================================
what ``data.model.allow`` gives        :class:`PolicyDecision`
=====================================  ============================================
``true``                               allowed, reason ``"allowed"``
``false``                              denied, ``"Policy evaluation denied"``
undefined (no body held, no default)   denied, ``"Policy returned undefined"``
anything else (string, number, set…)   denied, ``"Policy did not return a boolean"``
the text does not parse                denied, ``"Failed to add policy: <msg>"``
no rule ``allow`` in ``package model``  denied, ``"Policy evaluation failed: not a valid rule path"``
evaluation error / time-out / crash    denied, ``"Policy evaluation failed: <msg>"``
=====================================  ============================================

These are the outcomes and texts of the reference library (regorus 0.4), which evaluates
the policy with no input document.  When a denying policy also defines ``reason`` (or
``deny_reason``) in ``package model``, its value is appended: ``"<message>: <reason>"``.

Differences from the reference, on purpose:

* We pass an input document (:func:`build_input`: host, uid/gid/user, provider, mount
  path, file name, time).  Policies written for the reference never read ``input``, so
  they behave the same; ``input.*`` is undefined there and defined here.
* The engine is rego-cpp (``regopy``).  It is more lenient than regorus: it accepts Rego
  v0 syntax (``allow { true }``, ``deny[msg] { ... }``) even under ``import rego.v1``,
  and reads it with odd meanings (``allow[x] { x := 1 }`` becomes the object
  ``{"1": true}``).  The reference rejects v0 bodies at parse time, so before the engine
  sees the text we refuse any top-level rule body not introduced by ``if``:
  ``"Failed to add policy: policy.rego:L:C: error: `if` keyword is required before rule
  body"`` (deny).  Built-in errors (``1/0``, ``to_number("x")``) are made strict, as in
  regorus, so they deny with ``"Policy evaluation failed: ..."`` instead of silently
  turning a rule undefined (or, in rego-cpp's lenient mode, even ``false``).
* rego-cpp also accepts a module with no ``package`` line; the reference does not, so
  that is refused too (``"Failed to add policy: policy.rego:1:1: error: expecting
  `package`"``).
* Exact wording of parse and evaluation messages after the prefix comes from rego-cpp,
  not regorus; only the prefixes are the reference's.
* rego-cpp integers are 64-bit and wrap on overflow (``time.now_ns() - 1e19`` is
  negative): write time windows with values that fit in int64.

Safety for untrusted policy text: rego-cpp CAN run unbounded.  ``count(numbers.range(1,
200000000))`` runs for tens of seconds and takes gigabytes; a 3000x3000 comprehension
takes ~6 s.  Its C API has no cancellation or time limit, a ctypes call cannot be
interrupted, and its allocator (snmalloc) refuses to start under any ``RLIMIT_AS`` /
``RLIMIT_DATA`` (``Failed to initialise snmalloc.``, abort).  So the engine never runs in
this process: it runs in a long-lived worker subprocess (``python -m``-style bootstrap of
this module) that answers one JSON line per request.  The parent waits at most
``timeout`` seconds (default :data:`DEFAULT_TIMEOUT_S`) and watches the worker's resident
memory (:data:`MAX_WORKER_RSS`); past either it kills the worker (a new one starts on the
next call) and denies.  A worker crash (abort, segfault) also denies.  Calls are
serialised by a lock; the worker is reused (about 2-5 ms per evaluation once started;
start-up is ~0.1-0.3 s, paid once).  The exact default policy
(:data:`DEFAULT_POLICY_SOURCE`) is allowed without starting the engine.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..format.policyfield import DEFAULT_POLICY_SOURCE, make_policy_field, parse_policy_field

__all__ = [
    "DEFAULT_POLICY_SOURCE",
    "DEFAULT_TIMEOUT_S",
    "PolicyDecision",
    "parse_policy_field",
    "make_policy_field",
    "evaluate",
    "build_input",
    "shutdown_engine",
]

#: Longest a single evaluation may take before the worker is killed and access denied.
DEFAULT_TIMEOUT_S = 5.0
#: Largest resident set the engine worker may reach (bytes) before it is killed.
MAX_WORKER_RSS = 1 << 30
#: Largest policy text accepted (characters); a header-embedded policy is tiny.
MAX_POLICY_CHARS = 1 << 20
#: Longest policy-supplied reason kept in a decision.
MAX_REASON_CHARS = 512
#: How long starting the worker (interpreter + ``import regopy``) may take.
WORKER_START_TIMEOUT_S = 30.0

ALLOWED = "allowed"
DENIED = "Policy evaluation denied"
UNDEFINED = "Policy returned undefined"
NOT_BOOLEAN = "Policy did not return a boolean"
ADD_FAILED = "Failed to add policy"
EVAL_FAILED = "Policy evaluation failed"
NOT_A_RULE_PATH = "not a valid rule path"

_MODULE_NAME = "policy.rego"
_RULE_QUERY = "x := data.model.allow"
_REASON_RULES = ("reason", "deny_reason")


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    reason: str


# --------------------------------------------------------------------------------------
# The input document
# --------------------------------------------------------------------------------------


def build_input(*, file_name: str, mount_path: str | None, provider: str | None,
                uid: int | None = None, gid: int | None = None) -> dict:
    """The input document handed to the policy.

    ``uid``/``gid`` default to this process's; a FUSE server may pass the caller's.
    """
    if uid is None:
        uid = os.getuid()
    if gid is None:
        gid = os.getgid()
    try:
        import pwd
        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = None
    now_ns = time.time_ns()
    stamp = _dt.datetime.fromtimestamp(now_ns // 1_000_000_000, tz=_dt.timezone.utc)
    # "+00:00" rather than "Z": rego-cpp's time.parse_rfc3339_ns rejects the "Z" form.
    rfc3339 = stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{now_ns % 1_000_000_000:09d}+00:00"
    return {
        "hostname": socket.gethostname(),
        "uid": int(uid),
        "gid": int(gid),
        "user": user,
        "groups": sorted(set(os.getgroups())),
        "pid": os.getpid(),
        "provider": provider,
        "mount_path": mount_path,
        "file_name": file_name,
        "time_ns": now_ns,
        "time_rfc3339": rfc3339,
    }


# --------------------------------------------------------------------------------------
# Rego v0 guard (rego-cpp accepts v0 bodies; the reference does not)
# --------------------------------------------------------------------------------------

# Tokens after which a top-level "{" opens a value (object/set literal or comprehension),
# not a rule body.  After anything else (a name, "]", ")", "}", a literal, "else") a
# top-level "{" is a rule body without "if": Rego v0.
_VALUE_CONTEXT = {
    ":=", "=", "==", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "|", "&",
    ",", ":", ";", "if", "contains", "in", "not", "some", "every", "with", "as",
}
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?)
  | (?P<raw>`[^`]*`?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9][0-9.eE+\-]*)
  | (?P<op>:=|==|!=|<=|>=|.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _line_col(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    col = offset - (source.rfind("\n", 0, offset) + 1) + 1
    return line, col


def _first_token(source: str) -> tuple[str, tuple[int, int]] | None:
    for m in _TOKEN_RE.finditer(source):
        if m.lastgroup not in ("ws", "comment"):
            return m.group(), _line_col(source, m.start())
    return None


def _find_v0_body(source: str) -> tuple[int, int] | None:
    """(line, col) of the first top-level rule body not introduced by ``if``, if any."""
    depth = 0
    prev: str | None = None
    in_every = False  # `allow if every x in xs { ... }`: that "{" is every's body
    for m in _TOKEN_RE.finditer(source):
        kind = m.lastgroup
        if kind in ("ws", "comment"):
            continue
        tok = m.group()
        if kind == "name" and tok == "every" and depth == 0:
            in_every = True
        if kind == "op" and tok in "([{":
            if tok == "{" and depth == 0:
                if in_every:
                    in_every = False
                elif prev is not None and prev not in _VALUE_CONTEXT:
                    return _line_col(source, m.start())
            depth += 1
        elif kind == "op" and tok in ")]}":
            depth = max(0, depth - 1)
        prev = tok if kind in ("op", "name") else kind
    return None


# --------------------------------------------------------------------------------------
# Engine (runs only inside the worker subprocess)
# --------------------------------------------------------------------------------------

_UNDEF = object()
_ERRMSG_RE = re.compile(r"\(error(?: \d+:([^|\s]*)\|(\d+)\|(\d+))?\s*\(errormsg (\d+):", re.S)


def _sexpr_messages(text: str, source: str | None = None, limit: int = 3) -> list[str]:
    """Messages out of rego-cpp's s-expression error dump ``(error ... (errormsg N:...))``."""
    data = text.encode("utf-8", "surrogatepass")
    out = []
    for m in _ERRMSG_RE.finditer(text):
        # the length prefix counts bytes; map the match end (chars) to bytes
        start_b = len(text[: m.end()].encode("utf-8", "surrogatepass"))
        n = int(m.group(4))
        msg = data[start_b:start_b + n].decode("utf-8", "replace")
        if m.group(1) is not None and source is not None:
            offset_b = int(m.group(2))
            offset = len(source.encode("utf-8")[:offset_b].decode("utf-8", "ignore"))
            line, col = _line_col(source, offset)
            msg = f"{m.group(1)}:{line}:{col}: {msg}"
        out.append(msg)
        if len(out) >= limit:
            break
    return out


def _node_messages(node_impl: Any, limit: int = 3) -> list[str]:
    from regopy.rego_shared import rego, rego_node_get, rego_node_size, rego_node_value
    from regopy.node import NodeKind

    out: list[str] = []

    def walk(impl: Any, depth: int) -> None:
        if not impl or depth > 6 or len(out) >= limit:
            return
        kind = rego.regoNodeType(impl)
        if kind == NodeKind.ErrorMessage:
            try:
                out.append(rego_node_value(impl))
            except Exception:  # noqa: BLE001
                pass
            return
        if kind in (NodeKind.ErrorSeq, NodeKind.Error):
            for i in range(rego_node_size(impl)):
                walk(rego_node_get(impl, i), depth + 1)

    walk(node_impl, 0)
    return out


def _new_interpreter(source: str, input_json: str | None) -> Any:
    from regopy import Interpreter, LogLevel

    interp = Interpreter()
    interp.log_level = LogLevel.NONE
    interp.strict_built_in_errors = True
    if input_json is not None:
        interp.set_input_term(input_json)
    interp.add_module(_MODULE_NAME, source)
    return interp


def _query_x(interp: Any, query: str) -> tuple[str, Any]:
    """Run ``query`` binding ``x``: ("ok", value) / ("ok", _UNDEF) / ("error", message)."""
    from regopy.rego_shared import (rego_free_output, rego_output_node, rego_output_ok,
                                    rego_output_string, rego_query)

    impl = rego_query(interp._impl, query)
    try:
        if not rego_output_ok(impl):
            msgs = _node_messages(rego_output_node(impl))
            return "error", "; ".join(msgs) or "unknown error"
        text = rego_output_string(impl)
        if text.strip() == "undefined":
            return "ok", _UNDEF
        try:
            obj = json.loads(text)
        except ValueError:
            msgs = _sexpr_messages(text)
            return "error", "; ".join(msgs) or text.strip()[:300]
        results = obj if isinstance(obj, list) else [obj]
        values = [r.get("bindings", {}).get("x", _UNDEF) for r in results if isinstance(r, dict)]
        values = [v for v in values if v is not _UNDEF]
        if not values:
            return "ok", _UNDEF
        if any(v != values[0] or type(v) is not type(values[0]) for v in values[1:]):
            return "error", "complete rules must not produce multiple outputs"
        return "ok", values[0]
    finally:
        rego_free_output(impl)


def _allow_rule_defined(source: str) -> bool:
    """Whether ``package model`` defines a rule ``allow`` (regorus's "valid rule path")."""
    import shutil
    import tempfile

    interp = _new_interpreter(source, None)
    bundle = interp.build(_RULE_QUERY, [])
    tmp = tempfile.mkdtemp(prefix="ctfs-policy-")
    try:
        path = os.path.join(tmp, "bundle")
        interp.save_bundle(path, bundle)
        with open(os.path.join(path, "plan.json"), encoding="utf-8") as fh:
            plan = json.load(fh)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    funcs = plan.get("funcs", {}).get("funcs", []) or []
    return any(list(f.get("path", []))[1:] == ["model", "allow"] for f in funcs)


def _clean_reason(value: Any) -> str | None:
    if value is _UNDEF or value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "…"
    return text or None


def _engine_evaluate(source: str, input_doc: Any) -> tuple[bool, str]:
    """Evaluate in this process.  Unbounded time for hostile policies: worker only."""
    from regopy import RegoError

    input_json = None if input_doc is None else json.dumps(input_doc, allow_nan=False)
    try:
        interp = _new_interpreter(source, input_json)
    except RegoError as exc:
        msgs = _sexpr_messages(str(exc), source) or [str(exc).strip()[:300]]
        return False, f"{ADD_FAILED}: " + "; ".join(msgs)
    status, value = _query_x(interp, _RULE_QUERY)
    if status == "error":
        return False, f"{EVAL_FAILED}: {value}"
    if value is True:
        return True, ALLOWED
    if value is False:
        base = DENIED
    elif value is _UNDEF:
        try:
            defined = _allow_rule_defined(source)
        except Exception:  # noqa: BLE001 - the message is a nicety; the decision is deny
            defined = True
        if not defined:
            return False, f"{EVAL_FAILED}: {NOT_A_RULE_PATH}"
        base = UNDEFINED
    else:
        base = NOT_BOOLEAN
    for rule in _REASON_RULES:
        try:
            status, reason = _query_x(interp, f"x := data.model.{rule}")
        except Exception:  # noqa: BLE001
            continue
        text = _clean_reason(reason) if status == "ok" else None
        if text:
            return False, f"{base}: {text}"
    return False, base


def _precheck(source: Any) -> str | None:
    """Reasons to refuse the text before any engine sees it (None: go on)."""
    if not isinstance(source, str):
        return f"{ADD_FAILED}: policy source must be a string, got {type(source).__name__}"
    if len(source) > MAX_POLICY_CHARS:
        return f"{ADD_FAILED}: policy is too large ({len(source)} > {MAX_POLICY_CHARS} characters)"
    if "\x00" in source:
        return f"{ADD_FAILED}: policy contains a NUL character"
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        return f"{ADD_FAILED}: policy is not valid UTF-8"
    first = _first_token(source)
    if first is None or first[0] != "package":
        line, col = (1, 1) if first is None else first[1]
        return f"{ADD_FAILED}: {_MODULE_NAME}:{line}:{col}: error: expecting `package`"
    where = _find_v0_body(source)
    if where is not None:
        line, col = where
        return (f"{ADD_FAILED}: {_MODULE_NAME}:{line}:{col}: error: `if` keyword is required "
                "before rule body (Rego v0 syntax is not supported)")
    return None


#: regopy releases whose internals ctfs uses (``regopy.rego_shared``'s C functions on an
#: ``Interpreter``'s ``_impl``, for error messages and single bindings); pyproject.toml pins
#: the same range, and the worker checks it before it says it is ready.
REGOPY_RANGE = ((1, 5), (1, 6))
_REGOPY_NEEDS = ("rego", "rego_node_get", "rego_node_size", "rego_node_value", "rego_free_output",
                 "rego_output_node", "rego_output_ok", "rego_output_string", "rego_query")


def check_regopy(regopy: Any) -> str | None:
    """Why this regopy cannot serve as ctfs's engine, with the fix, or None if it can."""
    lo, hi = REGOPY_RANGE
    pin = f"regopy>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    version = str(getattr(regopy, "__version__", "unknown"))
    try:
        ok = lo <= tuple(int(x) for x in version.split(".")[:2]) < hi
    except ValueError:
        ok = False
    missing = [n for n in _REGOPY_NEEDS if not hasattr(getattr(regopy, "rego_shared", None), n)]
    if not hasattr(getattr(regopy, "Interpreter", None), "__init__") or missing:
        ok = False
    if ok:
        try:
            ok = hasattr(regopy.Interpreter(), "_impl")
        except Exception:  # noqa: BLE001
            ok = False
    if ok:
        return None
    return (f"ctfs needs {pin} (found regopy {version}"
            + (f", without rego_shared.{', '.join(missing)}" if missing else "")
            + f"); install it with: pip install '{pin}'")


def worker_main() -> None:
    """Entry point of the engine worker: one JSON request per line on stdin."""
    # rego-cpp prints diagnostics on stdout: keep a private copy of stdout for replies
    # and point fd 1 at /dev/null.
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        import regopy
        import regopy.rego_shared  # noqa: F401 - check_regopy looks inside
        why = check_regopy(regopy)
        regopy.set_default_log_level("None")
        hello = {"ready": True, "engine": f"regopy {regopy.__version__}"} if why is None else \
            {"ready": False, "error": why}
    except Exception as exc:  # noqa: BLE001
        hello = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
    reply.write(json.dumps(hello) + "\n")
    reply.flush()
    if not hello["ready"]:
        return
    for line in sys.stdin:
        try:
            req = json.loads(line)
            allowed, reason = _engine_evaluate(req["source"], req.get("input"))
            resp = {"allowed": bool(allowed), "reason": str(reason)}
        except Exception as exc:  # noqa: BLE001
            resp = {"allowed": False,
                    "reason": f"{EVAL_FAILED}: internal error: {type(exc).__name__}: {exc}"}
        reply.write(json.dumps(resp) + "\n")
        reply.flush()


# --------------------------------------------------------------------------------------
# Worker management (parent side)
# --------------------------------------------------------------------------------------


class _EngineWorker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.starts = 0  # how many workers were started (for tests / diagnostics)

    # -- process handling -------------------------------------------------------------
    def _spawn(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (f"import sys; sys.path.insert(0, {root!r}); "
                "from ctfs.auth.policy import worker_main; worker_main()")
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, env=env,
            cwd="/",  # never inside a mount this process may itself be serving
        )
        self._buf = b""
        self.starts += 1
        hello = self._read_line(WORKER_START_TIMEOUT_S)
        if not isinstance(hello, dict) or not hello.get("ready"):
            detail = hello.get("error") if isinstance(hello, dict) else hello
            self._kill()
            raise RuntimeError(f"policy engine unavailable: {detail}")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def _rss(self) -> int:
        try:
            with open(f"/proc/{self._proc.pid}/statm", "rb") as fh:  # type: ignore[union-attr]
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return 0

    def _read_line(self, timeout: float) -> Any:
        """Next JSON line from the worker, or a str saying why there is none."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"timed out after {timeout:g} s"
            ready, _, _ = select.select([fd], [], [], min(left, 0.05))
            if not ready:
                if self._rss() > MAX_WORKER_RSS:
                    return f"memory limit exceeded ({MAX_WORKER_RSS >> 20} MiB)"
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self._proc.poll()
                if code is None:
                    try:
                        code = self._proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        code = "?"
                return f"policy engine crashed (exit status {code})"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return "policy engine sent garbage"

    # -- requests ---------------------------------------------------------------------
    def evaluate(self, source: str, input_doc: Any, timeout: float) -> PolicyDecision:
        req = json.dumps({"source": source, "input": input_doc}, allow_nan=False) + "\n"
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                try:
                    self._spawn()
                except (OSError, RuntimeError) as exc:
                    return PolicyDecision(False, f"{EVAL_FAILED}: {exc}")
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(req.encode("utf-8"))
                self._proc.stdin.flush()
            except OSError:
                self._kill()
                return PolicyDecision(False, f"{EVAL_FAILED}: policy engine crashed")
            resp = self._read_line(timeout)
            if not isinstance(resp, dict):
                self._kill()
                return PolicyDecision(False, f"{EVAL_FAILED}: {resp}")
            allowed = resp.get("allowed") is True
            return PolicyDecision(allowed, str(resp.get("reason", "")))

    def shutdown(self) -> None:
        with self._lock:
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


_WORKER = _EngineWorker()
atexit.register(_WORKER.shutdown)


def shutdown_engine() -> None:
    """Stop the engine worker (it restarts on the next :func:`evaluate`)."""
    _WORKER.shutdown()


def evaluate(local_source: str, input_doc: dict | None = None, *,
             timeout: float | None = None) -> PolicyDecision:
    """Evaluate the ``local`` policy; ``data.model.allow`` must be exactly ``true``.

    Never raises for anything about the policy text: every problem is a denial whose
    ``reason`` says why (see the module docstring for the table).  ``input_doc=None``
    evaluates with no input document, as the reference does.  ``timeout`` (seconds,
    default :data:`DEFAULT_TIMEOUT_S`) bounds the evaluation.
    """
    if local_source == DEFAULT_POLICY_SOURCE:
        return PolicyDecision(True, ALLOWED)
    refused = _precheck(local_source)
    if refused is not None:
        return PolicyDecision(False, refused)
    if input_doc is not None:
        try:
            input_doc = json.loads(json.dumps(input_doc, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return PolicyDecision(False, f"{EVAL_FAILED}: input is not JSON: {exc}")
    return _WORKER.evaluate(local_source, input_doc,
                            DEFAULT_TIMEOUT_S if timeout is None else float(timeout))
