"""The sandbox against a corpus of hostile samples (tests/eval/hostile/*.py.txt), in both of its modes.

Every hostile sample defines a wrong `add` (or none) and attacks the host or the verdict; each must get a
non-pass verdict within its time limit, leave no process behind, change nothing outside its scratch dir,
make no network connection, and leave the test process (and a bystander process) alive. The sandbox runs
with its kernel namespaces (`ns`) and without them (`uid-only`, the fallback where the OS refuses them);
a case that needs a layer the mode lacks is skipped with the layer named (the module docstring says why).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ultrafuser.eval import sandbox
from ultrafuser.eval.sandbox import MARKER_ENV, VERDICTS, isolation_report, run_program

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux"),
    pytest.mark.timeout(120),  # a hang is a failure, never a stuck CI job (pytest-timeout)
]

HOSTILE = Path(__file__).parent / "hostile"
CHECKER = (
    "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n    assert candidate(0, 0) == 0\n\n\n"
    "check(add)\n"
)
TIMEOUT_S = 5.0  # most samples end by themselves long before
SHORT_TIMEOUT_S = 1.0  # for the samples that must be stopped by the time limit
SLACK_S = 6.0  # the machine is shared: allow for load, never for a hang
SECRET = "ULTRAFUSER_TEST_SECRET"

# name -> (allowed statuses, layers needed in that mode, extra run_program kwargs)
NONPASS = {"failed", "timeout", "output_limit"}
CASES: dict[str, tuple[set[str], tuple[str, ...], dict]] = {
    "fork_bomb": ({"timeout", "failed"}, ("nproc",), {"timeout_s": SHORT_TIMEOUT_S}),
    "orphan": ({"failed"}, (), {}),
    "memory_bomb": ({"failed"}, (), {}),
    "memory_creep": ({"failed"}, (), {"memory_mb": 256}),
    "disk_fill_one_file": ({"failed"}, (), {}),
    "disk_fill_many_files": ({"failed"}, ("tmpfs-scratch",), {}),
    "endless_stdout": ({"output_limit"}, (), {}),
    "endless_stderr_child": ({"output_limit"}, (), {}),
    "sleep_forever": ({"timeout"}, (), {"timeout_s": SHORT_TIMEOUT_S}),
    "busy_loop": ({"timeout", "failed"}, (), {"timeout_s": SHORT_TIMEOUT_S}),
    "read_stdin": ({"failed"}, (), {}),
    "kill_parent": ({"failed"}, ("uid|pidns",), {}),
    "kill_own_group": ({"failed"}, ("uid|pidns",), {}),
    "write_outside": ({"failed"}, ("uid|ro-root",), {}),
    "read_secrets": ({"failed"}, (), {}),
    "network_socket": ({"failed"}, (), {}),
    "network_subprocess": ({"failed"}, ("netns",), {}),
    "early_os_exit": ({"failed"}, (), {}),
    "early_sys_exit": ({"failed"}, (), {}),
    "exit_from_thread": ({"failed"}, (), {}),
    "redefine_check": ({"failed"}, (), {}),
    "patch_builtins": ({"failed"}, (), {}),
    "fake_pass_output": ({"failed"}, (), {}),
    "swallow_checker": ({"failed"}, (), {}),
    "forge_getframe": ({"failed"}, (), {}),
    "forge_traceback": ({"failed"}, (), {}),
    "forge_settrace": ({"failed"}, (), {}),
    "forge_in_str": ({"failed"}, (), {}),
    "forge_signal_handler": ({"failed"}, (), {}),
    "forge_handoff": ({"failed"}, (), {}),
    "introspection": ({"failed"}, (), {}),
    "read_parent_memory": ({"failed"}, ("uid|no-proc",), {}),
}
MODES = {"ns": True, "uid-only": False}


def test_corpus_and_table_agree():
    assert sorted(p.name.removesuffix(".py.txt") for p in HOSTILE.glob("*.py.txt")) == sorted(CASES)


def _procs_with_marker(uid: int | None, sandbox_id: str) -> list[int]:
    """Host processes (zombies too) that run as the sample's uid or carry its marker, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        uids = next((ln.split()[1:4] for ln in status.splitlines() if ln.startswith("Uid:")), [])
        if (uid is not None and str(uid) in uids) or f"{MARKER_ENV}={sandbox_id}".encode() in environ:
            found.append(int(entry.name))
    return found


def _assert_nothing_survives(result) -> None:
    deadline = time.monotonic() + 3.0  # zombies of killed orphans are reaped by the host's init
    while (left := _procs_with_marker(result.uid, result.sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes of sandbox {result.sandbox_id} (uid {result.uid}) survive: {left}"


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[str, ...]]:
    report = {mode: run_program("pass", namespaces=ns, timeout_s=30) for mode, ns in MODES.items()}
    for mode, r in report.items():
        assert r.status == "passed", f"{mode}: a trivial program does not pass: {r}"
    return {mode: r.isolation for mode, r in report.items()}


@pytest.fixture
def host(tmp_path, monkeypatch):
    """What the attacks aim at: a bystander process, files outside scratch, a listener, a secret."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    canary.chmod(0o644)
    work = Path(tempfile.mkdtemp(prefix="ultrafuser-test-work-"))  # reachable by the sample's uid
    work.chmod(0o755)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", listener.getsockname()[1]))
    secret = secrets.token_hex(16)
    monkeypatch.setenv(SECRET, secret)
    tmp_target = Path("/tmp") / f"ultrafuser-pwned-{secrets.token_hex(6)}"
    fill = {
        "__TEST_PID__": str(os.getpid()),
        "__BYSTANDER_PID__": str(bystander.pid),
        "__OPEN_DIR__": str(open_dir),
        "__CANARY__": str(canary),
        "__TMP_TARGET__": str(tmp_target),
        "__PORT__": str(listener.getsockname()[1]),
    }
    yield {
        "fill": fill,
        "bystander": bystander,
        "open_dir": open_dir,
        "canary": canary,
        "work": work,
        "listener": listener,
        "udp": udp,
        "secret": secret,
        "tmp_target": tmp_target,
    }
    bystander.kill()
    bystander.wait()
    shutil.rmtree(work, ignore_errors=True)
    listener.close()
    udp.close()
    if tmp_target.exists():
        tmp_target.unlink()


def _source(name: str, fill: dict[str, str]) -> str:
    text = (HOSTILE / f"{name}.py.txt").read_text()  # .txt: not collected, linted or compiled as code
    for key, value in fill.items():
        text = text.replace(key, value)
    return text


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_sample(name, mode, layers, host):
    statuses, needs, kwargs = CASES[name]
    for need in needs:
        if not any(n in layers[mode] for n in need.split("|")):
            pytest.skip(f"mode {mode} lacks {need} on this host (has: {', '.join(layers[mode])})")
    kwargs = {"timeout_s": TIMEOUT_S, **kwargs}
    result = run_program(
        _source(name, host["fill"]),
        checker=CHECKER,
        workdir=str(host["work"]),
        namespaces=MODES[mode],
        **kwargs,
    )

    assert result.status in statuses and result.status in NONPASS, result
    assert result.elapsed_s <= kwargs["timeout_s"] + SLACK_S, result
    _assert_nothing_survives(result)
    # the host: the test process (we are running) and the bystander are alive; nothing outside scratch
    assert host["bystander"].poll() is None, "the bystander process was killed"
    assert os.listdir(host["work"]) == [], "the sandbox's dir was not removed"
    assert host["canary"].read_text() == "original" and (host["canary"].stat().st_mode & 0o777) == 0o644
    assert not host["tmp_target"].exists(), f"{host['tmp_target']} was written"
    outside = sorted(os.listdir(host["open_dir"]))
    if "ro-root" in layers[mode]:
        assert outside == [], f"files written outside scratch: {outside}"
    # no connection reached the listener, no datagram either (the kernel queues them for us: the sample has
    # ended, so anything it sent is already waiting)
    host["listener"].setblocking(False)
    with pytest.raises(BlockingIOError):
        host["listener"].accept()
    host["udp"].setblocking(False)
    with pytest.raises(BlockingIOError):
        host["udp"].recv(100)
    # the secret never reaches the sample; no attack step reports success
    assert host["secret"] not in result.stdout + result.stderr + result.detail
    assert "ESCAPED" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    "name", ["forge_getframe", "forge_traceback", "forge_settrace", "forge_signal_handler"]
)
def test_forgeries_work_without_the_audit_hook(name, host, monkeypatch):
    """Control: each forge attack really produces a pass when the audit hook is not installed."""
    runner = sandbox._STAGE.replace("sys.addaudithook(hook)", "(lambda h: None)(hook)")
    assert runner != sandbox._STAGE
    monkeypatch.setattr(sandbox, "_STAGE", runner)
    result = run_program(_source(name, host["fill"]), checker=CHECKER, timeout_s=TIMEOUT_S)
    assert result.status == "passed", result


def test_early_handoff_works_without_the_line_check(host, monkeypatch):
    """Control: an early hand-off forges a pass unless the keeper checks where the harness stands."""
    result = run_program(_source("forge_handoff", host["fill"]), checker=CHECKER, timeout_s=TIMEOUT_S)
    assert result.status == "failed" and "hand-off" in result.detail, result
    runner = sandbox._STAGE.replace("if run_frame.f_lineno in lines:", "if True:")
    assert runner != sandbox._STAGE
    monkeypatch.setattr(sandbox, "_STAGE", runner)
    result = run_program(_source("forge_handoff", host["fill"]), checker=CHECKER, timeout_s=TIMEOUT_S)
    assert result.status == "passed", result


def test_introspection_routes_are_refused():
    probe = (
        "import gc, sys\nok = []\nfor name, f in [('gc', gc.get_objects), ('frames', sys._current_frames),"
        " ('getframe', lambda: sys._getframe(0))]:\n    try:\n        f(); ok.append(name)\n"
        "    except RuntimeError as e:\n        print(e)\nassert ok == [], ok\n"
    )
    result = run_program(probe, timeout_s=10)
    assert result.status == "passed", result
    assert (
        "gc.get_objects is not allowed" in result.stdout and "sys._getframe is not allowed" in result.stdout
    )


def test_no_ctypes_class_is_reachable():
    """ctypes classes give raw memory access to anyone who finds them via object.__subclasses__()."""
    probe = """
seen, todo = set(), [object]
while todo:
    c = todo.pop()
    try:
        subs = c.__subclasses__()
    except TypeError:
        subs = type.__subclasses__(c)
    for s in subs:
        if s not in seen:
            seen.add(s)
            todo.append(s)
bad = [c for c in seen if "ctypes" in getattr(c, "__module__", "")]
print(len(seen))
assert not bad, bad
"""
    result = run_program(probe, timeout_s=10)
    assert result.status == "passed", result
    assert int(result.stdout) > 100  # the walk did see the interpreter's classes


def test_orphans_of_a_passing_program_are_killed():
    source = _source("orphan", {}).replace("return a - b", "return a + b")
    result = run_program(source, checker=CHECKER, timeout_s=10)
    assert result.status == "passed", result
    assert result.elapsed_s < 5, "the verdict waited for the orphan"
    _assert_nothing_survives(result)


def test_good_code_passes_and_output_is_captured():
    work = Path(tempfile.mkdtemp(prefix="ultrafuser-test-work-"))
    work.chmod(0o755)
    try:
        source = (
            "import sys, tempfile\ndef add(a, b):\n    return a + b\nprint('hello')\n"
            "print('warn', file=sys.stderr)\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
            "open('here.txt', 'w').write('scratch is writable')\n"
        )
        result = run_program(source, checker=CHECKER, timeout_s=10, workdir=str(work))
        assert result.status == "passed" and result.returncode == 0, result
        assert result.stdout == "hello\n" and result.stderr == "warn\n"
        assert os.listdir(work) == [], "the scratch dir was not removed"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs samples under a separate uid")
def test_unreachable_workdir_is_refused(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not reachable"):
        run_program("pass", workdir=str(private))


def test_stdlib_imports_work_in_the_sandbox():
    source = (
        "import json.tool, email.mime.text, xml.dom.minidom, hashlib, fractions, statistics, decimal\n"
        "import collections, typing, enum, dataclasses, heapq, itertools, re, math, random, string\n"
        "P = collections.namedtuple('P', 'a b'); T = typing.TypeVar('T'); E = enum.Enum('E', 'A B')\n"
        "print(hashlib.md5(b'x').hexdigest())\n"
    )
    result = run_program(source, timeout_s=10)
    assert result.status == "passed", result
    assert result.stdout == "9dd4e461268c8034f5c8564e155c67a6\n"


@pytest.mark.parametrize(
    "source, detail",
    [
        ("def add(a, b) return a + b", "SyntaxError"),
        ("def add(a, b):\n    return a - b", "AssertionError"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
        ("import os\nos._exit(3)", "exited with status 3"),
    ],
)
def test_failures_are_failed_with_a_reason(source, detail):
    result = run_program(source, checker=CHECKER, timeout_s=10)
    assert result.status == "failed", result
    assert detail in result.detail, result


def test_verdict_set_and_isolation_report():
    report = isolation_report()
    assert report.status in VERDICTS and report.status == "passed"
    assert "nproc" in report.isolation
    if os.geteuid() == 0:
        assert "uid" in report.isolation
    for note in report.notes:  # a refused layer is named with the reason
        assert note


def _has_cap_sys_admin() -> bool:
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), 16)
    return bool(cap_eff & (1 << 21))


@pytest.mark.skipif(os.geteuid() != 0 or not _has_cap_sys_admin(), reason="needs root with CAP_SYS_ADMIN")
def test_all_layers_are_applied_where_the_os_allows_them():
    report = isolation_report()
    expected = {"uid", "nproc", "netns", "mountns", "pidns", "ro-root", "tmpfs-scratch", "no-proc"}
    assert expected <= set(report.isolation), (report.isolation, report.notes)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=-1)


ALWAYS_EQUAL = "class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
INT_SUBCLASS = "class Liar(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"


PLAIN_CHECK = "assert add(1, 2) == 3\nassert add(2, 2) == 5\n"  # the second check is wrong for honest code


@pytest.mark.parametrize(
    "source,checker",
    [
        (ALWAYS_EQUAL + "def add(a, b):\n    return AlwaysEqual()\n", PLAIN_CHECK),
        (INT_SUBCLASS + "def add(a, b):\n    return Liar(0)\n", PLAIN_CHECK),
        (ALWAYS_EQUAL + "def add(a, b):\n    return [AlwaysEqual()]\n", "assert add(1, 2) == [3]\nassert add(2, 2) == [5]\n"),
        # first call honest, then it rebinds its global name to a cheat that the checks would look up next
        (ALWAYS_EQUAL + "def add(a, b):\n    global add\n    add = lambda a, b: AlwaysEqual()\n    return a + b\n",
         PLAIN_CHECK),
    ],
    ids=["always-equal", "int-subclass", "nested", "rebinds-its-name"],
)
def test_values_that_claim_equality_cannot_pass(source, checker):
    if "global add" not in source:  # control: without the plain-data check the attack works
        assert run_program(source, checker=checker, timeout_s=10).status == "passed"
    result = run_program(source, checker=checker, timeout_s=10, plain_results=("add",))
    assert result.status == "failed", result
    honest = "def add(a, b):\n    return a + b\n"
    assert run_program(honest, checker="assert add(1, 2) == 3\n", timeout_s=10, plain_results=("add",)).passed


def test_plain_nested_values_pass():
    source = "def add(a, b):\n    return {'s': [a + b, (float(a), None)], 'k': {1, frozenset({b})}, 'b': b'x', 'c': 1j}\n"
    checker = "r = add(1, 2)\nassert r['s'][0] == 3 and r['b'] == b'x' and r['c'] == 1j and True is not None\n"
    result = run_program(source, checker=checker, timeout_s=10, plain_results=("add",))
    assert result.status == "passed", result
    with pytest.raises(ValueError, match="plain_results"):
        run_program(source, checker=checker, plain_results="add")
