"""The sandbox supervisor: a small trusted process that runs each sample in a fresh child.

Started by the trainer as ``python -I -S -B supervisor.py`` with an empty environment, and kept for the
life of the trainer process; it never runs untrusted code itself. Protocol (JSON lines): stdin = one
config line, then batches, each one line per job and an ``{"end": true}`` line; stdout = one
``{"layers": ...}`` line, then per batch one result line per job (in completion order) and ``{"done": true}``.

Samples are not forked from the supervisor, whose memory holds the batch (every sample's code and input)
and earlier samples' outputs, but from a *zygote*: a process the supervisor forks at start-up, after its
imports and before it reads any job, which only ever receives pipe ends. Per job the zygote forks the
sample (one fresh process per sample; no exec, so no interpreter start-up), waits for it and reports its
pid, then its wait status and CPU time (wait4), to the supervisor; the sample reads its own job from a
pipe, so its memory holds its own job and nothing of any other sample's. Before running anything
untrusted the sample:

* moves into its own process group (the seccomp filter then forbids leaving it: ``setsid``/``setpgid``);
* drops to an unprivileged uid when the supervisor is root (``PERENNIAL_SANDBOX_UID``, default 65534);
* sets rlimits: address space, CPU, file size, open files, no core dumps, and processes;
* takes a fresh scratch directory as cwd/HOME/TMPDIR and a minimal environment;
* restricts itself with Landlock (read: the interpreter's standard library and shared libraries; write:
  the scratch directory only; no TCP; no signals or abstract sockets outside its own domain);
* loads a seccomp filter (libseccomp through `pyseccomp`): no sockets, no exec, no fork unless
  ``processes > 1``, no signals except to its own process group, no ptrace / process_vm_* /
  pidfd_* / io_uring / namespaces / keyrings / BPF / SysV IPC / POSIX message queues, no rlimit or
  priority changes of other processes.

The supervisor is a child subreaper (the zygote is not: a sample's orphans are reparented to the
supervisor) and non-dumpable. It enforces the wall-clock limit, the scratch
size (polled) and an output cap, and when the sample's main process ends (or is killed) it kills the
sample's whole process group and any orphan that was reparented to it, then removes the scratch dir
(at once when empty, else in the background: `_Trash`).
Verdicts come only from what the supervisor observes (exit status, the bytes on stdout) plus the
compile record the child writes on fd 3 *before* any untrusted code runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
_libc = ctypes.CDLL(None, use_errno=True)

STDOUT_CAP = 1 << 20  # bytes of a sample's stdout kept (more is an `output` limit)
STDERR_TAIL = 2048
RECORDS_CAP = 1 << 16  # bytes of fd-3 records read
ENTRY_MIN_BYTES = 4096  # what each scratch entry counts at least: empty files and directories use inodes
SCRATCH_MAX_DEPTH = 64  # directories nested deeper stop the sample (the size poll must see everything)
SCRATCH_MAX_ENTRIES = 10_000  # files and directories: more stop the sample (each poll walks them all)
# before each sample and the end of a batch, at most this long for earlier scratch trees to be removed (in
# the background): within the 3 s per sample the trainer allows beyond `timeoutSeconds`
TRASH_WAIT_S = 1.0
# stdlib modules imported before forking: children use them without reading the disk (and without
# paying for the import), also where the sandbox uid cannot read the interpreter's directory
PRELOAD = ("math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "re", "string", "json",
           "random", "typing", "dataclasses", "fractions", "decimal", "statistics", "operator", "copy",
           "io", "traceback", "array", "datetime", "time", "textwrap", "unicodedata", "enum", "abc", "struct",
           "glob", "fnmatch", "pathlib", "hashlib", "base64", "binascii", "pickle", "csv", "contextlib", "warnings",
           "weakref", "numbers", "pprint", "queue", "threading", "zlib", "calendar", "locale", "shlex", "difflib", "ast")


def _prctl(option: int, arg: int) -> None:
    _libc.prctl(option, arg, 0, 0, 0)


# --------------------------------------------------------------------------- seccomp


def _seccomp_filter(processes: int):
    """The filter (not loaded). Default allow; the calls below fail with EPERM (ENOSYS for clone3, so
    glibc falls back to clone, whose flags can be inspected)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)

    def deny(name, *args, action=eperm):
        try:
            f.add_rule(action, name, *args)
        except (ValueError, RuntimeError, OSError):  # not a system call of this architecture
            pass

    for name in (
        # other processes: tracing, memory, descriptors, signals by pid
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
        "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "migrate_pages", "move_pages", "get_robust_list",
        "process_madvise", "process_mrelease", "ioprio_set", "setpriority",
        # leaving the process group (the whole tree is killed through it)
        "setsid", "setpgid",
        # running other programs
        "execve", "execveat",
        # kernel attack surface and privileges
        "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
        "keyctl", "add_key", "request_key", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
        "open_by_handle_at", "name_to_handle_at", "fanotify_init", "quotactl", "acct", "swapon", "swapoff",
        "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "iopl", "ioperm",
        "syslog", "vhangup", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsmount", "fspick",
        # memory outside the address-space limit
        "memfd_create", "memfd_secret",
        # SysV IPC and POSIX message queues: objects that outlive the sample (memory no limit counts, a
        # channel to the samples after it)
        "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget", "msgsnd",
        "msgrcv", "msgctl", "ipc", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
        "mq_getsetattr",
        # networking: no socket of any family (socketpair stays for AF_UNIX pairs)
        "socket",
    ):
        deny(name)
    deny("socketpair", sc.Arg(0, sc.NE, 1))  # AF_UNIX == 1
    deny("kill", sc.Arg(0, sc.NE, 0))  # only kill(0, sig): its own process group
    deny("prlimit64", sc.Arg(0, sc.NE, 0))
    for name in ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr"):
        deny(name, sc.Arg(0, sc.NE, 0))
    for req in (0x5412, 0x541C):  # TIOCSTI, TIOCLINUX: typing into a terminal
        deny("ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, req))
    deny("clone3", action=sc.ERRNO(errno.ENOSYS))
    if processes <= 1:
        for name in ("fork", "vfork"):
            deny(name, action=sc.ERRNO(errno.EAGAIN))
        deny("clone", sc.Arg(0, sc.MASKED_EQ, 0x00010000, 0), action=sc.ERRNO(errno.EAGAIN))  # not CLONE_THREAD
    for flag in (0x10000000, 0x00020000, 0x20000000, 0x40000000, 0x08000000, 0x04000000, 0x02000000):
        # CLONE_NEWUSER, NEWNS, NEWPID, NEWNET, NEWIPC, NEWUTS, NEWCGROUP
        deny("clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    return f


def _seccomp_available() -> bool:
    try:
        import pyseccomp  # noqa: F401

        return _libc.prctl(21, 0, 0, 0, 0) >= 0  # PR_GET_SECCOMP
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- the child


def _landlock_rules(scratch: str) -> list[tuple[str, int]]:
    import sysconfig

    import landlock as ll

    rules: list[tuple[str, int]] = [(scratch, ll.WRITE_ALL), ("/dev/null", ll.READ_FILE | ll.WRITE_FILE),
                                    ("/dev/zero", ll.READ_FILE), ("/dev/urandom", ll.READ_FILE),
                                    ("/etc/ld.so.cache", ll.READ_FILE)]
    paths = sysconfig.get_paths()
    for d in {paths["stdlib"], paths["platstdlib"], os.path.join(paths["stdlib"], "lib-dynload")}:
        rules.append((d, ll.READ))
    libdirs = set()
    with open("/proc/self/maps") as f:  # directories of the shared libraries the interpreter has loaded
        for line in f:
            p = line.split(maxsplit=5)[-1].strip()
            if p.startswith("/") and ".so" in os.path.basename(p):
                libdirs.add(os.path.dirname(p))
    rules += [(d, ll.READ) for d in sorted(libdirs)]
    return rules


def _count_tasks(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                st = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in st.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            n += int(fields.get("Threads", "1"))
    return n


def _child(job, cfg, fds, scratch, seccomp_filter, nonce) -> None:
    """In the forked child: confine, then run the job. Never returns."""
    try:
        os.setpgid(0, 0)
        stdin_r, out_w, err_w, rec_w = fds
        for src, dst in ((stdin_r, 0), (out_w, 1), (err_w, 2), (rec_w, 3)):
            os.dup2(src, dst)
        os.closerange(4, 2**31 - 1)  # close_range(2): every other descriptor (the pipes to the trainer, ...)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["zygote_pid"]:  # the zygote died (with the supervisor): nothing would wait or kill
            raise RuntimeError("the sample's zygote is gone")
        lim = cfg["limits"]
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        mem = lim["memory_mib"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
        fsize = lim["file_size_mib"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        os.chdir(scratch)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"})
        tempfile.tempdir = scratch
        if cfg["landlock_abi"]:
            import landlock

            landlock.restrict_self(cfg["landlock_rules"] + [(scratch, cfg["scratch_rights"])], cfg["landlock_abi"])
        else:
            _libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: needed by seccomp
        if seccomp_filter is not None:
            seccomp_filter.load()
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox set-up failed: {e!r}\n".encode())
        os._exit(70)
    _run(job, nonce)


def _run(job, nonce: str) -> None:
    """The harness, in the confined child. Everything it reports goes to fd 3; only the first record
    (compile result) is written before untrusted code runs, so only that one is trusted for code jobs."""
    import builtins
    import io

    write, exit_ = os.write, os._exit  # captured before untrusted code can replace them

    def report(obj) -> None:
        try:
            write(3, (json.dumps(obj) + "\n").encode())
        except OSError:
            pass

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace", write_through=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace", write_through=True)
    sys.argv = ["<sample>"]

    def describe(e: BaseException) -> str:
        return "".join(traceback.format_exception_only(type(e), e)).strip()[:500]

    kind = job["kind"]
    if kind == "grade":
        ns = {"__name__": "grader", "__builtins__": builtins}
        try:
            exec(compile(job["code"], "<grader>", "exec"), ns)  # noqa: S102 - the point: confined untrusted code
            grade = ns.get("grade")
            if not callable(grade):
                raise TypeError("`grade` is not defined or not callable")
        except BaseException as e:  # noqa: BLE001
            report({"error": "grader source failed: " + describe(e)})
            exit_(0)
        try:  # the value as returned (no float(): True and '0.9' are not scores, the trainer says so)
            value = grade(job["sample"], job["item"])
            t = type(value)
            if t is int:
                value = float(value)  # OverflowError for ints beyond a float: reported below
            if t in (int, float, bool, type(None)):
                report({"value": value})
            elif t is str:
                report({"value": value[:100]})
            else:
                report({"error": f"grade() returned a {t.__name__}, not a number"})
        except BaseException as e:  # noqa: BLE001
            report({"error": describe(e)})
        sys.stdout.flush()
        exit_(0)

    try:
        code = compile(job["code"], "<completion>", "exec")
    except BaseException as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL), RecursionError, MemoryError
        report({"compiled": False, "error": describe(e)})
        exit_(0)
    report({"compiled": True})
    if kind == "compile":
        exit_(0)
    ns = {"__name__": "__main__", "__builtins__": builtins}
    if kind == "io":
        os.close(3)  # nothing more comes from this process but its exit status and its stdout
        status = 0
        try:
            exec(code, ns)  # noqa: S102 - the point: confined untrusted code
        except SystemExit as e:
            status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            status = 1
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            status = status or 1
        exit_(status & 0xFF)
    # asserts: the code, then the tests. Prepared before the code runs: the tests (compiled, their
    # comparisons made strict), a copy of the builtins they see, the functions the harness calls.
    try:
        tests = _strict_tests(job["tests"])
    except BaseException as e:  # noqa: BLE001
        report({"failed": "error", "error": "the tests do not compile: " + describe(e)})
        exit_(1)
    run_exec, clean_builtins, (cmp, op, abs_) = exec, dict(vars(builtins)), _strict_comparisons()
    clean_builtins["abs"] = abs_
    settrace, setprofile, type_, str_ = sys.settrace, sys.setprofile, type, str
    try:
        run_exec(code, ns)
        settrace(None)  # a trace function left by the code could jump over the asserts
        setprofile(None)
        # the code's globals, less those named like a builtin (`all = lambda *a: True` must not answer the
        # tests' `assert all(...)`): globals come before builtins in a lookup
        globs = {k: v for k, v in ns.items() if not (type_(k) is str_ and k in clean_builtins and k[:2] != "__")}
        globs["__builtins__"] = clean_builtins
        run_exec(tests, globs)
        globs["__perennial_tests__"](cmp, op)
    except AssertionError as e:
        report({"failed": "assertion", "error": describe(e) or "AssertionError"})
        exit_(1)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: exiting early is not passing
        report({"failed": "error", "error": describe(e)})
        exit_(1)
    report({"passed": nonce})
    exit_(0)


def _strict_tests(source: str):
    """Assert-style tests as a code object defining ``__perennial_tests__(cmp, op)``: every comparison inside
    an ``assert`` (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``, chained or not, at the
    top or nested in ``and``/``all(...)``/a comprehension) becomes ``cmp(ops, *operands)``, and every
    arithmetic operation there (``x - 5``, ``-x``) ``op(name, *operands)``: both accept only plain built-in
    values (an object that says yes to everything, or whose ``__sub__``/``__abs__`` answers what passes
    ``abs(x - 5) < 1e-9``, fails), and they are local names the code under test cannot rebind."""
    import ast

    tree = ast.parse(source, "<tests>")
    strict_ops = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)

    class Strict(ast.NodeTransformer):
        def visit_Compare(self, node):
            self.generic_visit(node)
            if not all(isinstance(op, strict_ops) for op in node.ops):  # `is`: identity cannot be faked
                return node
            ops = ast.Tuple([ast.Constant(type(op).__name__) for op in node.ops], ast.Load())
            return ast.Call(ast.Name("__perennial_cmp__", ast.Load()), [ops, node.left, *node.comparators], [])

        def visit_BinOp(self, node):
            self.generic_visit(node)
            return ast.Call(ast.Name("__perennial_op__", ast.Load()), [ast.Constant(type(node.op).__name__), node.left, node.right], [])

        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, ast.Not):  # truthiness: a constant answer cannot pass both `f(x)` and `not f(y)`
                return node
            return ast.Call(ast.Name("__perennial_op__", ast.Load()), [ast.Constant(type(node.op).__name__), node.operand], [])

    class Asserts(ast.NodeTransformer):
        def visit_Assert(self, node):
            node.test = Strict().visit(node.test)
            return node

    body = Asserts().visit(tree).body or [ast.Pass()]
    args = ast.arguments(posonlyargs=[], args=[ast.arg("__perennial_cmp__"), ast.arg("__perennial_op__")], kwonlyargs=[],
                         kw_defaults=[], defaults=[])
    fn = ast.FunctionDef("__perennial_tests__", args, body, [], None, None)
    module = ast.fix_missing_locations(ast.Module([fn], []))
    return compile(module, "<tests>", "exec")


def _strict_comparisons():
    """(cmp, op, abs) over plain values only: bool/int/float/complex/str/bytes/None/range and lists, tuples,
    dicts, sets of them, exact types (no subclasses), so the comparison, arithmetic and `abs` are the
    built-in ones (a comparison of other values is false; arithmetic or `abs` of them fails the assert).
    Built from references taken before the code under test runs."""
    import operator

    type_, id_, set_, len_, range_, abs_, failure = type, id, set, len, range, abs, AssertionError
    plain_types = (bool, int, float, complex, str, bytes, type(None), range)
    seqs, maps, sets = (list, tuple), (dict,), (set, frozenset)
    fns = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
           "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}
    arith = {"Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv,
             "FloorDiv": operator.floordiv, "Mod": operator.mod, "Pow": operator.pow, "MatMult": operator.matmul,
             "LShift": operator.lshift, "RShift": operator.rshift, "BitOr": operator.or_, "BitXor": operator.xor,
             "BitAnd": operator.and_, "USub": operator.neg, "UAdd": operator.pos, "Invert": operator.invert}

    def plain(x, seen) -> bool:
        t = type_(x)
        if t in plain_types:
            return True
        if id_(x) in seen:
            return False
        seen.add(id_(x))
        if t in seqs or t in sets:
            for y in x:
                if not plain(y, seen):
                    return False
            return True
        if t in maps:
            for k in x:
                if not plain(k, seen) or not plain(x[k], seen):
                    return False
            return True
        return False

    def cmp(ops, *xs) -> bool:
        for x in xs:
            if not plain(x, set_()):
                return False
        for i in range_(len_(ops)):
            if not fns[ops[i]](xs[i], xs[i + 1]):
                return False
        return True

    def op(name, *xs):
        for x in xs:
            if not plain(x, set_()):
                raise failure(f"{name} of a value that is not a plain built-in one")
        return arith[name](*xs)

    def strict_abs(x):
        if not plain(x, set_()):
            raise failure("abs() of a value that is not a plain built-in one")
        return abs_(x)

    return cmp, op, strict_abs


# --------------------------------------------------------------------------- the supervisor loop


class _Running:
    def __init__(self, job, pid, scratch, out_r, err_r, rec_r, nonce, deadline):
        self.job, self.pid, self.scratch, self.nonce, self.deadline = job, pid, scratch, nonce, deadline
        self.bufs = {out_r: bytearray(), err_r: bytearray(), rec_r: bytearray()}
        self.out_r, self.err_r, self.rec_r = out_r, err_r, rec_r
        self.open = {out_r, err_r, rec_r}
        self.status: int | None = None
        self.cpu_s = 0.0  # CPU time of the sample's main process (and the children it waited for), when reaped
        self.limit: str | None = None
        self.truncated = False
        self.started = time.monotonic()
        self.next_scan = self.started + 0.02  # the scratch size is polled at most every 20 ms


def _scratch_over(path: str, limit: int) -> bool:
    """Whether a sample's scratch directory is over `limit` bytes, each entry counted at least
    ENTRY_MIN_BYTES, holds more than SCRATCH_MAX_ENTRIES entries, or cannot be measured whole: nested
    deeper than SCRATCH_MAX_DEPTH, a path past PATH_MAX, a directory the supervisor cannot read.
    Iterative (no recursion limit to hit), and it stops as soon as the answer is known, so one poll costs
    at most SCRATCH_MAX_ENTRIES stats however large `scratchMiB` is."""
    total, entries, stack = 0, 0, [(path, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):  # removed or replaced since it was listed
            continue
        except OSError:
            return True
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    return True
                total += max(st.st_blocks * 512, ENTRY_MIN_BYTES)
                entries += 1
                if total > limit or entries > SCRATCH_MAX_ENTRIES:
                    return True
                if stat.S_ISDIR(st.st_mode):
                    if depth >= SCRATCH_MAX_DEPTH:
                        return True
                    stack.append((entry.path, depth + 1))
    return False


def _chmod_dir(name: str, dir_fd: int | None = None) -> None:
    """`chmod 0700` the directory `name` (relative to `dir_fd`), never what a link there points to (a
    sample without Landlock can put one where its scratch was); nothing else is a directory to make ours."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


class _Trash:
    """Where the scratch trees of ended samples are removed: in the background, by a few threads, so that
    a sample's result and the next sample do not wait for it. Removing costs far more than making: on a
    busy ext4 disk one `rmdir` of an empty directory blocks 2-4 ms (mkdir: 0.25 ms), so the 10,000+
    directories a sample makes before a poll stops it took the supervisor 25-40 s, past the trainer's
    deadline; several `rmdir`s at once overlap those waits (4 threads: 6-14x faster on such a disk).

    A tree is moved (one rename) into this supervisor's trash directory, ``perennial-rm-*`` next to the
    scratch directories, which it holds an exclusive `flock` on for its life. The threads empty each
    directory there through descriptors (no recursion, no long paths; the sample's own modes do not keep
    it): files are unlinked, subdirectories moved up into the trash as entries of their own, for any
    thread to take. A trash directory nobody holds (its supervisor died, e.g. killed with the trainer,
    mid-removal) is taken over by the next supervisor that starts, with the scratch directories of the
    samples that supervisor was running (named after its trash: ``perennial-sample-<tag>-*``). Waits
    (`wait`) are for this supervisor's own samples' trees, not for what it took over."""

    WORKERS = 4

    def __init__(self, root: str):
        import fcntl
        import threading

        new = tempfile.mkdtemp(prefix="perennial-rmnew-", dir=root)  # not yet a name others take over
        self.fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.tag = os.path.basename(new)[len("perennial-rmnew-"):]
        self.path = os.path.join(root, "perennial-rm-" + self.tag)
        os.rename(new, self.path)
        self.n = 0
        self.pending: list[tuple[str, bool]] = []  # entries of the trash directory to remove, and whether our samples'
        self.own = 0  # entries of our own samples' trees pending or being removed
        self.cv = threading.Condition()
        for name in sorted(os.listdir(root)):  # trash of supervisors that died
            if name.startswith("perennial-rm-") and os.path.join(root, name) != self.path:
                self._take_over(os.path.join(root, name))
        for _ in range(self.WORKERS):
            threading.Thread(target=self._work, daemon=True).start()

    def _name(self) -> str:
        with self.cv:
            self.n += 1
            return str(self.n)

    def _take_over(self, path: str) -> None:
        import fcntl

        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if os.fstat(fd).st_uid != os.geteuid():  # not a supervisor's: another user's, in a shared /tmp
                return
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its supervisor lives
            name = self._name()
            os.rename(path, name, dst_dir_fd=self.fd)
            self.pending.append((name, False))
            root, tag = os.path.dirname(path), os.path.basename(path)[len("perennial-rm-"):]
            for sample in os.listdir(root):  # the scratch of the samples it was running
                if sample.startswith(f"perennial-sample-{tag}-"):
                    name = self._name()
                    try:
                        _chmod_dir(os.path.join(root, sample))
                        os.rename(os.path.join(root, sample), name, dst_dir_fd=self.fd)
                        self.pending.append((name, False))
                    except OSError:
                        pass
        except OSError:
            pass
        finally:
            os.close(fd)

    def put(self, path: str) -> None:
        """Remove the (dead) sample's scratch directory `path`: at once when it is empty, which it mostly
        is; otherwise moved into the trash for the threads."""
        try:
            os.rmdir(path)
            return
        except OSError:
            pass
        name = self._name()
        try:
            _chmod_dir(path)  # moving a directory rewrites its `..`
            os.rename(path, name, dst_dir_fd=self.fd)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return
        with self.cv:
            self.pending.append((name, True))
            self.own += 1
            self.cv.notify()

    def wait(self, seconds: float) -> bool:
        """Wait until every tree put here is removed, at most `seconds`; whether it is."""
        end = time.monotonic() + seconds
        with self.cv:
            while self.own:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
                name, own = self.pending.pop()
            try:
                self._remove(name, own)
            except Exception:  # noqa: BLE001 - a tree that cannot be removed stays; the thread goes on
                traceback.print_exc()
            finally:
                with self.cv:
                    self.own -= own
                    if not self.own:
                        self.cv.notify_all()

    def _more(self, names: list[str], own: bool) -> None:
        with self.cv:
            self.pending += [(n, own) for n in names]
            self.own += len(names) if own else 0
            self.cv.notify_all()
        names.clear()

    def _remove(self, name: str, own: bool) -> None:
        """Remove the entry `name` of the trash: files unlinked, subdirectories moved up into the trash
        (handed to the other threads as they go), then the directory itself."""
        try:
            os.rmdir(name, dir_fd=self.fd)  # an empty directory: most of a flood's
            return
        except NotADirectoryError:  # a link (or file) the sample put where its scratch was
            os.unlink(name, dir_fd=self.fd)
            return
        except OSError:
            pass
        try:
            _chmod_dir(name, self.fd)  # the sample's own modes must not keep it
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError:
            return
        moved: list[str] = []
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for e, is_dir in entries:
                if len(moved) >= 64:
                    self._more(moved, own)
                try:
                    if is_dir:
                        _chmod_dir(e, fd)  # moving a directory rewrites its `..`
                        up = self._name()
                        os.rename(e, up, src_dir_fd=fd, dst_dir_fd=self.fd)
                        moved.append(up)
                    else:
                        os.unlink(e, dir_fd=fd)
                except OSError:
                    pass
        finally:
            os.close(fd)
            self._more(moved, own)
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            pass


def _kill_tree(pgid: int, reap, deadline_s: float = 2.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        reap()
        time.sleep(0.001)


def _read_config_line() -> bytes:
    """The config line, read byte by byte from fd 0: a buffered read would take in (some of) the first
    batch's jobs with it, and the zygote, forked next, must never hold any job."""
    line = bytearray()
    while not line.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            break
        line += c
    return bytes(line)


def _write_all(fd: int, data: bytes, seconds: float = 2.0) -> None:
    """Write `data` whole to a pipe or give up after `seconds` (the reader is a sample: it may not read)."""
    try:
        os.set_blocking(fd, False)
        view = memoryview(data)
        end = time.monotonic() + seconds
        while view and time.monotonic() < end:
            try:
                view = view[os.write(fd, view[:65536]):]
            except BlockingIOError:
                time.sleep(0.001)
    except OSError:
        pass


def _zygote(ctl, cfg: dict, seccomp_filter) -> None:
    """The process every sample is forked from, and their parent. Forked by the supervisor at start-up,
    before it reads any job, and it never receives one: per sample it gets only the sample's pipe ends
    (SCM_RIGHTS), forks the sample and answers its pid; when a sample ends it reports its pid, wait
    status and CPU time (wait4). The sample reads its own job from its job pipe. So a sample's memory
    holds its own job and nothing of any other: the supervisor's, which holds the batch and earlier
    outputs, is never forked. The zygote is not a subreaper: a sample's orphans go to the supervisor."""
    import select

    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)  # the trainer's pipes: the zygote neither reads jobs nor writes results
    os.dup2(null, 1)
    os.close(null)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    cfg["zygote_pid"] = os.getpid()
    rsig, wsig = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wsig)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    import socket

    while True:
        ready, _, _ = select.select([ctl, rsig], [], [])
        if rsig in ready:
            try:
                os.read(rsig, 4096)
            except BlockingIOError:
                pass
        while True:  # every sample that ended: its status goes to the supervisor
            try:
                pid, st, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ctl.send(json.dumps({"exit": pid, "status": st, "cpu": ru.ru_utime + ru.ru_stime}).encode())
        if ctl not in ready:
            continue
        try:
            _, fds, _, _ = socket.recv_fds(ctl, 16, 8)
        except OSError:
            os._exit(1)
        if len(fds) != 5:
            os._exit(0)  # the supervisor closed the channel (or is gone)
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (rsig, wsig):
                    os.close(fd)
                ctl.close()
                _sample(fds, cfg, seccomp_filter)
            finally:
                os._exit(70)
        if pid > 0:
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
        for fd in fds:
            os.close(fd)
        ctl.send(json.dumps({"pid": pid}).encode())


def _sample(fds, cfg: dict, seccomp_filter) -> None:
    """In the sample, a child of the zygote: read its job (the supervisor's, sent once it has the sample's
    pid), then confine itself and run it. Never returns."""
    try:
        stdin_r, out_w, err_w, rec_w, job_r = fds
        data = bytearray()
        while chunk := os.read(job_r, 1 << 16):
            data += chunk
        os.close(job_r)
        msg = json.loads(data)
        cfg["nproc"] = msg["nproc"]
    except BaseException as e:  # noqa: BLE001 - the supervisor died, or gave up writing the job
        os.write(2, f"sandbox set-up failed: the job did not arrive whole: {e!r}\n".encode())
        os._exit(70)
    _child(msg["job"], cfg, (stdin_r, out_w, err_w, rec_w), msg["scratch"], seccomp_filter, msg["nonce"])
    os._exit(70)


def main() -> None:
    cfg = json.loads(_read_config_line())
    sys.path[:0] = cfg["sys_path"]
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent"]:
        sys.exit(1)
    for m in PRELOAD:
        try:
            __import__(m)
        except ImportError:
            pass
    import gc

    gc.freeze()  # children share these objects copy-on-write; the collector then leaves them alone
    import landlock

    lim = cfg["limits"]
    abi = landlock.abi_version()
    seccomp_ok = _seccomp_available()
    layers = {"landlock": abi, "seccomp": seccomp_ok, "subreaper": True, "no_new_privs": True,
              "uid": cfg["uid"] if os.geteuid() == 0 else os.geteuid()}
    out = sys.stdout.buffer

    def emit(obj) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    off = set(cfg.get("layers_off", ()))  # tests and benchmarks turn single layers off to show the others hold
    seccomp_filter = _seccomp_filter(lim["processes"]) if seccomp_ok and "seccomp" not in off else None
    abi = 0 if "landlock" in off else abi
    cfg["landlock_abi"] = abi
    cfg["landlock_rules"] = _landlock_rules("/nonexistent") if abi else []
    cfg["scratch_rights"] = landlock.WRITE_ALL
    uid = cfg["uid"] if os.geteuid() == 0 else os.geteuid()
    import socket

    ctl, zctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = os.fork()  # before the first job is read: see _zygote
    if zygote == 0:
        try:
            ctl.close()
            _zygote(zctl, cfg, seccomp_filter)
        finally:
            os._exit(1)
    zctl.close()
    trash = _Trash(cfg["scratch_root"])  # its threads start after the zygote's fork
    emit({"layers": layers})

    rsig, wsig = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wsig)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(rsig, selectors.EVENT_READ)
    sel.register(ctl, selectors.EVENT_READ)  # the zygote's reports: samples' pids and exits
    running: dict[int, _Running] = {}
    parallel = max(1, cfg["parallel"])

    early: dict[int, tuple[int, float]] = {}  # exits reported before the sample's pid was (killed before its job came)

    def on_report(msg: dict) -> int | None:
        """A report of the zygote: a sample's exit is recorded; a new sample's pid is returned."""
        if "exit" in msg:
            pid, st, cpu = msg["exit"], msg["status"], msg["cpu"]
            if pid in running:
                running[pid].status, running[pid].cpu_s = st, cpu
            else:
                early[pid] = (st, cpu)
            return None
        return msg["pid"]

    def report(block: bool) -> dict | None:
        try:
            data = ctl.recv(4096, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not data:
            raise RuntimeError("the zygote died")
        return json.loads(data)

    def reap() -> None:
        while (msg := report(False)) is not None:  # the samples: the zygote is their parent and waits for them
            on_report(msg)
        while True:  # orphans that left a sample and were reparented to this subreaper
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def sweep_orphans() -> None:
        """Kill children of this subreaper that belong to no running sample (reparented escapees), round
        after round: killing one reparents its children here, and a killed process stays listed until it
        is reaped, which happens only after its children were reparented."""
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                with open(f"/proc/self/task/{os.getpid()}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                return
            strays = []
            for pid in kids:
                if pid in running or pid == zygote:
                    continue
                try:
                    if os.getpgid(pid) in running:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    strays.append(pid)
                except ProcessLookupError:
                    strays.append(pid)  # a zombie, or one dying: reap it and look again
            reap()
            if not strays:
                return
            time.sleep(0.0005)

    def start(job) -> None:
        scratch = tempfile.mkdtemp(prefix=f"perennial-sample-{trash.tag}-", dir=cfg["scratch_root"])
        if os.geteuid() == 0:
            os.chown(scratch, cfg["uid"], cfg["gid"])
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(5)]  # stdin, stdout, stderr, records, the job
        nonce = os.urandom(16).hex()
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1], pipes[4][0]]
        socket.send_fds(ctl, [b"fork"], theirs)
        for fd in theirs:
            os.close(fd)
        pid = None
        while pid is None:  # exits of the samples running meanwhile may come first
            pid = on_report(report(True))
        if pid <= 0:
            raise RuntimeError("the zygote could not fork a sample")
        # the sample gets its job, and nothing else, through its pipe
        _write_all(pipes[4][1], json.dumps({"job": job, "nonce": nonce, "scratch": scratch, "nproc": cfg["nproc"]}).encode())
        os.close(pipes[4][1])
        _write_all(pipes[0][1], (job.get("stdin") or "").encode())  # whole or not at all: a pipe holds 64 KiB
        os.close(pipes[0][1])
        r = _Running(job, pid, scratch, pipes[1][0], pipes[2][0], pipes[3][0], nonce, time.monotonic() + lim["timeout_s"])
        for fd in (r.out_r, r.err_r, r.rec_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, r)
        running[pid] = r
        if pid in early:
            r.status, r.cpu_s = early.pop(pid)
        emit({"started": job["id"], "pgid": pid})  # should this supervisor die, the trainer kills the group

    def read_fd(r: _Running, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(fd)
            os.close(fd)
            r.open.discard(fd)
            return
        buf = r.bufs[fd]
        if fd == r.out_r:
            if len(buf) + len(chunk) > STDOUT_CAP:
                buf += chunk[: STDOUT_CAP - len(buf)]
                r.truncated = True
                r.limit = r.limit or "output"
            else:
                buf += chunk
        elif fd == r.err_r:
            buf += chunk
            del buf[:-STDERR_TAIL]
        elif len(buf) < RECORDS_CAP:
            buf += chunk[: RECORDS_CAP - len(buf)]

    def finish(r: _Running) -> None:
        _kill_tree(r.pid, reap)
        while r.status is None:  # killed with its group: the zygote reports it at once
            on_report(report(True))
        end = time.monotonic() + 0.5
        while r.open and time.monotonic() < end:  # the group is dead: the rest of the pipes is buffered
            for fd in list(r.open):
                read_fd(r, fd)
        for fd in list(r.open):
            sel.unregister(fd)
            os.close(fd)
        del running[r.pid]
        sweep_orphans()
        trash.put(r.scratch)
        records = []
        for line in bytes(r.bufs[r.rec_r]).splitlines()[:16]:
            try:
                rec = json.loads(line)
                records.append(rec if isinstance(rec, dict) else {})
            except (ValueError, RecursionError):  # written by the sample: `[[[[...` 60,000 deep is not JSON it may crash us with
                records.append({})
        st = r.status
        res = {"id": r.job["id"], "wall_s": round(time.monotonic() - r.started, 4), "limit": r.limit,
               "stdout": bytes(r.bufs[r.out_r]).decode("utf-8", "replace"), "stdout_truncated": r.truncated,
               "stderr": bytes(r.bufs[r.err_r]).decode("utf-8", "replace")}
        if os.WIFSIGNALED(st):
            res["signal"] = os.WTERMSIG(st)
            if res["signal"] == signal.SIGXCPU and not r.limit:
                res["limit"] = "cpu"
        else:
            res["exit_code"] = os.WEXITSTATUS(st)
        if r.cpu_s >= lim["cpu_s"] and not res["limit"]:  # SIGXCPU ignored: it ran on towards the hard limit
            res["limit"] = "cpu"
        kind = r.job["kind"]
        if kind == "grade":
            first = records[0] if records else {}
            value = first.get("value")  # the harness writes a scalar; anything else was written by the code
            scalar = value is None or type(value) in (int, float, bool, str)
            if type(value) is int:
                try:
                    value = float(value)  # as the harness does: the trainer checks floats
                except OverflowError:
                    scalar = False
            res["value"] = value if scalar else None
            res["error"] = str(first.get("error", ""))[:500] if scalar else "grade() result record is not a number"
        else:
            first = records[0] if records else {}
            res["compiled"] = first.get("compiled")
            res["compile_error"] = str(first.get("error", ""))[:500] if first.get("compiled") is False else ""
            if kind == "asserts":
                rest = records[1:]
                res["passed"] = any(x.get("passed") == r.nonce for x in rest) and res.get("exit_code") == 0 and not res["limit"]
                failed = next((x for x in rest if "failed" in x), {})
                why = failed.get("failed")  # untrusted: only the harness's two words pass, as plain strings
                res["failed"] = None if res["passed"] or why is None else why if why in ("assertion", "error") and type(why) is str else "error"
                res["error"] = str(failed.get("error", ""))[:500]
        emit(res)

    def batches():
        """Batches of jobs from stdin, each ended by an {"end": true} line, until EOF: the supervisor
        serves one trainer process for as long as it lives, so its start-up is paid once."""
        jobs: list = []
        for line in sys.stdin.buffer:
            msg = json.loads(line)
            if msg.get("end"):
                yield jobs
                jobs = []
            else:
                jobs.append(msg)

    for jobs in batches():
        if cfg["require_landlock"] and not cfg["landlock_abi"]:  # missing, or turned off
            for j in jobs:
                emit({"id": j["id"], "refused": "Landlock is required (`limits.requireLandlock`) but this kernel does not provide it"})
            emit({"done": True})
            continue
        tasks = _count_tasks(uid)  # RLIMIT_NPROC counts every task of the uid: the limit sits on top of them
        cfg["nproc"] = tasks + lim["processes"] + 8 if lim["processes"] > 1 else tasks + 16
        run_batch(jobs, start, running, parallel, sel, rsig, read_fd, reap, finish, lim, trash)
        trash.wait(TRASH_WAIT_S)
        emit({"done": True})


def run_batch(jobs, start, running, parallel, sel, rsig, read_fd, reap, finish, lim, trash) -> None:
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            trash.wait(TRASH_WAIT_S)  # the removal of earlier trees keeps up with samples that make many
            start(pending.pop(0))
        now = time.monotonic()
        timeout = min([min(r.deadline, r.next_scan) for r in running.values()], default=now + 1) - now
        for key, _ in sel.select(max(0.0, min(timeout, 0.1))):
            if key.data is None:  # the signal pipe, or the zygote's reports (read by reap() below)
                if key.fd == rsig:
                    try:
                        os.read(rsig, 4096)
                    except BlockingIOError:
                        pass
                continue
            read_fd(key.data, key.fd)
        reap()
        now = time.monotonic()
        for r in list(running.values()):
            if r.status is None and not r.limit:
                if now >= r.deadline:
                    r.limit = "wall"
                elif now >= r.next_scan:
                    if _scratch_over(r.scratch, lim["scratch_mib"] << 20):
                        r.limit = "scratch"
                    # every 20 ms, or less often when a walk is slow: the supervisor spends at most a fifth
                    # of its time walking, and reaches its deadline checks
                    r.next_scan = time.monotonic() + max(0.02, 4 * (time.monotonic() - now))
            if r.status is not None or r.limit:
                finish(r)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
