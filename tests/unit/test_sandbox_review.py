"""Adversarial review of the reward sandbox: attacks not in `test_sandbox_attacks.py`, each one found by
attacking the sandbox as an RL policy would (earn points it did not earn, hurt the trainer or the other
samples, outlive grading). Every test failed before its defence was built.

Untrusted code runs as a non-root uid (``PERENNIAL_SANDBOX_UID``), as in a pod. The uid differs from
the attack suite's, so the two suites can run at the same time.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from perennial.api import Grader
from perennial_trainer import sandbox
from perennial_trainer.graders import grade, grade_batch
from sandbox_support import ADD_IO, ADD_TESTS, code_grader, fenced, uid_pids

UID = 47013  # no other process on the machine runs as this uid


def _ipc_objects(uid: int) -> list[tuple[str, int]]:
    """SysV IPC objects (shared memory, semaphores, message queues) owned by `uid`: (kind, id)."""
    found = []
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as f:
            header = f.readline().split()
            for line in f:
                row = dict(zip(header, line.split()))
                if int(row["uid"]) == uid:
                    found.append((kind, int(row[{"shm": "shmid", "sem": "semid", "msg": "msqid"}[kind]])))
    return found


def _scratch_dirs(uid: int) -> list[str]:
    """Scratch directories of `uid`'s samples, also those in a supervisor's trash (being removed)."""
    found = []
    tmp = tempfile.gettempdir()
    for d in glob.glob(os.path.join(tmp, "perennial-sample-*")) + glob.glob(os.path.join(tmp, "perennial-rm-*", "*")):
        try:
            if os.lstat(d).st_uid == uid:
                found.append(d)
        except FileNotFoundError:  # another uid's sample (another suite, a benchmark) ended meanwhile
            pass
    return found


def _scratch_dirs_after_removal(uid: int, seconds: float = 300) -> list[str]:
    """`_scratch_dirs(uid)` once the supervisors' background removal is done: empty on three scans in a
    row (one scan can miss a directory being moved up inside a trash while its parent is removed), or
    what is left after `seconds`."""
    end, empty = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        dirs = _scratch_dirs(uid)
        empty = 0 if dirs else empty + 1
        if empty == 3:
            return []
        time.sleep(0.05)
    return dirs


@pytest.fixture(autouse=True)
def survives():
    """After every attack: an honest sample is graded correctly, nothing of the sandbox's uid is left
    running, no SysV IPC object of its uid exists, and its scratch directories are gone."""
    old = os.environ.get("PERENNIAL_SANDBOX_UID")
    os.environ["PERENNIAL_SANDBOX_UID"] = str(UID)
    try:
        yield
        assert grade(code_grader(), fenced("def add(a, b):\n    return a + b"), ADD_TESTS).score == 35
        left = []
        for _ in range(50):
            left = uid_pids(UID)
            if not left:
                break
            time.sleep(0.05)
        for p in left:
            os.kill(p, signal.SIGKILL)
        ipc = _ipc_objects(UID)
        for kind, ident in ipc:  # removed, so that one failure does not fail the tests after it
            os.system(f"ipcrm -{ {'shm': 'm', 'sem': 's', 'msg': 'q'}[kind]} {ident}")
        dirs = _scratch_dirs_after_removal(UID)  # trees of stopped samples are removed in the background
        for d in dirs:
            os.system(f"rm -rf '{d}'")
        assert not left, f"processes of the sandbox uid outlived grading: {left}"
        assert not ipc, f"SysV IPC objects of the sandbox uid outlived grading: {ipc}"
        assert not dirs, f"scratch directories were left behind: {dirs}"
    finally:
        if old is None:
            os.environ.pop("PERENNIAL_SANDBOX_UID", None)
        else:
            os.environ["PERENNIAL_SANDBOX_UID"] = old


# ----------------------------------------------------------------------------- the supervisor and the others


DEEP = "import os\nfor i in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('ok')"


def test_deep_directories_do_not_kill_the_supervisor():
    """Before: 3,000 nested directories made the supervisor's scratch walk (os.walk, recursive) raise
    RecursionError: the supervisor died, every other sample of its shard got an error outcome (the
    grader's failureScore) and the deep tree stayed in /tmp. Now the walk is iterative and stops a sample
    that nests deeper than a bound ("scratch" limit); the tree is removed without recursion."""
    outs = sandbox.run([sandbox.Job("io", DEEP), sandbox.Job("io", "print(5)"), sandbox.Job("io", "print(6)")],
                       sandbox.Limits(), parallel=1)
    assert [o.stdout for o in outs[1:]] == ["5\n", "6\n"], outs
    assert outs[0].limit == "scratch" or outs[0].exit_code == 0, outs[0]
    honest = fenced("a, b = map(int, input().split())\nprint(a + b)")
    rs = grade_batch(code_grader(), [fenced(DEEP + "\ndef add(a, b):\n    return a + b"), honest], [ADD_TESTS, ADD_IO])
    assert rs[1].score == 35, rs  # the honest neighbour is graded


def test_data_past_path_max_is_seen_by_the_size_poll():
    """Before: files below a directory chain longer than PATH_MAX (made with relative mkdir/chdir) were
    invisible to the size poll (ENAMETOOLONG, ignored): 12 MiB in a 8 MiB scratch went unnoticed. Now what
    the poll cannot measure stops the sample, and the tree is removed through directory descriptors."""
    code = ("import os, time\nfor i in range(25):\n    os.mkdir('d' * 200)\n    os.chdir('d' * 200)\n"
            "for i in range(3):\n    open(f'f{i}', 'wb').write(b'x' * (4 << 20))\ntime.sleep(3)\nprint('ok')")
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(scratch_mib=8))
    assert o.limit == "scratch", o


def test_empty_files_count_against_the_scratch_limit():
    """Before: empty files (and directories, symlinks) have no blocks, so `scratchMiB` never stopped a
    sample creating hundreds of thousands of them (inodes of the pod's disk; each size poll walked them
    all, stalling the supervisor past the sample's wall-clock limit). Now every entry counts at least 4 KiB."""
    code = "n = 0\nwhile True:\n    open('f%d' % n, 'w').close()\n    n += 1"
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(scratch_mib=1, timeout_s=20))
    assert o.limit == "scratch", o
    assert o.wall_s < 20, o


IPC = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
out = []
shm = libc.shmget(0x5EED1, 4096, 0o1666)  # IPC_CREAT | 0666
if shm >= 0:
    p = libc.shmat(shm, None, 0)
    out.append(ctypes.string_at(p, 8))
    ctypes.memmove(p, b"sample-A", 8)
out.append(libc.semget(0x5EED2, 1, 0o1666))
out.append(libc.msgget(0x5EED3, 0o1666))
out.append(libc.mq_open(b"/perennial-review", 0o100 | 2, 0o666, None))
print(shm, out)
"""


def test_sysv_ipc_does_not_outlive_the_sample():
    """Before: a sample created a SysV shared-memory segment (also semaphores, message queues) that
    outlived it: memory held after grading (the pod's, uncounted by any limit) and a channel to the
    samples after it ("sample-A" read by the next sample). Now seccomp denies SysV IPC and POSIX
    message queues."""
    a, b = sandbox.run([sandbox.Job("io", IPC), sandbox.Job("io", IPC)], sandbox.Limits(), parallel=1)
    assert a.exit_code == 0 and b.exit_code == 0, (a, b)
    assert "sample-A" not in b.stdout, b.stdout
    assert a.stdout.strip() == "-1 [-1, -1, -1]", a.stdout


# ----------------------------------------------------------------------------- what a sample's memory holds


PEEK = """
import gc, sys
A, B = "SIBLING", "-MARKER"  # never joined here: the joined marker exists only in the other samples
def has(v, a, b):
    i = v.find(a)
    while i >= 0:
        if v[i + len(a):i + len(a) + len(b)] == b:
            return True
        i = v.find(a, i + 1)
    return False
found = set()
def look(v, depth=0):
    if isinstance(v, str):
        if has(v, A, B):
            found.add("str")
    elif isinstance(v, (bytes, bytearray)):
        if has(v, A.encode(), B.encode()):
            found.add(type(v).__name__)
    elif depth < 3 and isinstance(v, dict):
        for x in list(v.values()):
            look(x, depth + 1)
    elif depth < 3 and isinstance(v, (list, tuple)):
        for x in list(v):
            look(x, depth + 1)
    elif depth < 3 and hasattr(v, "__dict__") and not isinstance(v, type):
        look(vars(v), depth + 1)
for o in gc.get_objects():
    look(o)
f = sys._getframe()
while f is not None:
    look(dict(f.f_locals))
    f = f.f_back
print(sorted(found))
"""


def test_a_sample_cannot_read_its_siblings():
    """Before: a forked sample found the previous sample's stdout (the supervisor's `_Running` object,
    still referenced by its loop) and the code and inputs of every other sample of the batch (the
    pending jobs) among its own objects: in GRPO the siblings are completions of the same prompt, so a
    sample could copy (or run and take the majority of) their answers. Now samples are forked from a zygote
    that never held any job, and each reads only its own job (see the raw-memory test below)."""
    prev = "print('SIBLING' + '-MARKER')"
    later = "# SIBLING-MARKER in a later sample's code\nprint(1)"
    outs = sandbox.run([sandbox.Job("io", prev), sandbox.Job("io", PEEK), sandbox.Job("io", later, stdin="SIBLING-MARKER\n")],
                       sandbox.Limits(), parallel=1)
    assert outs[1].exit_code == 0 and outs[1].stdout.strip() == "[]", outs[1]


# ----------------------------------------------------------------------------- as in a pod: one uid for all


def _as_pod_uid(script: str) -> subprocess.CompletedProcess:
    """Run `script` as a trainer would in a pod: non-root, so the supervisor and the samples share the uid
    (no CAP_DAC_OVERRIDE: the sample's own file modes bind the supervisor too). The interpreter must be
    one the uid can run (this checkout's may live under /root): the first of these that it can."""
    import pyseccomp

    path = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(sandbox.__file__))), os.path.dirname(pyseccomp.__file__)])
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for exe in (sys.executable, f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"):
        try:
            probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], user=UID, group=UID,
                                   extra_groups=[], capture_output=True, text=True, env={"PYTHONPATH": path}, check=False)
        except OSError:  # missing, or not executable by the uid
            continue
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return subprocess.run([exe, "-c", script], user=UID, group=UID, extra_groups=[], capture_output=True, text=True,
                                  env={"PYTHONPATH": path, "HOME": "/tmp", "PATH": "/usr/bin:/bin"}, timeout=120, check=False)
    raise AssertionError(f"no Python {want} interpreter that uid {UID} can run: this test needs one")


def test_a_locked_directory_neither_hides_data_nor_outlives_the_sample():
    """Before (the trainer non-root, as in a pod): a sample wrote 12 MiB into a directory it then made
    mode 000; the size poll could not look inside (8 MiB limit never hit), and the supervisor, same uid but
    not root, could not remove it: the data stayed on the pod's disk after grading, sample after sample.
    Now a directory the poll cannot read stops the sample, and the removal restores modes as it goes."""
    script = """
import json, os
from perennial_trainer import sandbox
code = ("import os, time\\nos.mkdir('locked')\\nopen('locked/big', 'wb').write(b'x' * (12 << 20))\\n"
        "os.chmod('locked', 0)\\ntime.sleep(2)\\nprint('ok')")
[o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(scratch_mib=8, timeout_s=5))
print(json.dumps({"uid": os.getuid(), "limit": o.limit, "exit": o.exit_code, "stdout": o.stdout}))
"""
    p = _as_pod_uid(script)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["uid"] == UID and out["limit"] == "scratch", out


# ----------------------------------------------------------------------------- assert-style tests


PERMISSIVE = """
class Yes:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __hash__(self): return 0
    def __sub__(self, other): return self
    __rsub__ = __add__ = __radd__ = __sub__
    def __abs__(self): return -1.0
    def __pow__(self, other): return -1.0
    def __neg__(self): return self
    def __contains__(self, item): return True
    def __bool__(self): return True
def add(a, b):
    return Yes()
"""


@pytest.mark.parametrize("tests", [
    "assert abs(add(2, 3) - 5) < 1e-9\nassert abs(add(-1, 1) - 0) < 1e-9",  # float tolerance checks
    "assert (add(2, 3) - 5) ** 2 < 1e-9\nassert -add(-1, 1) <= 0 <= add(-1, 1)",  # arithmetic
    "assert add(2, 3) in (5,)\nassert add(-1, 1) in [0]",  # membership
    "assert 4 < add(2, 3) <= 5\nassert add(-1, 1) >= 0 > -1",  # ordering, chained
    "assert add(2, 3) == 5 and add(-1, 1) == 0",  # `==` not at the top of the assert
    "assert all([add(2, 3) == 5, add(-1, 1) == 0])",
    "assert all(add(a, b) == c for a, b, c in [(2, 3, 5), (-1, 1, 0)])",
], ids=["abs-tolerance", "arithmetic", "in", "ordering", "and", "all-list", "all-genexp"])
def test_permissive_objects_fail_every_comparison(tests):
    """Before: only an assert's top-level `a == b` / `a != b` compared plain values, so an object that
    says yes to everything passed `abs(x - 5) < 1e-9`, `x in (5,)`, `4 < x <= 5`, and `==` inside `and`
    or `all(...)` (15 -> 35 points without solving anything). Now every comparison (`==`, `!=`, `<`,
    `<=`, `>`, `>=`, `in`, `not in`) anywhere in an assert compares plain built-in values only, and
    arithmetic there, and `abs()` in the tests, accept only plain values."""
    r = grade(code_grader(), fenced(PERMISSIVE), {"tests": tests})
    assert r.score == 15, r
    honest = grade(code_grader(), fenced("def add(a, b):\n    return a + b"), {"tests": tests})
    assert honest.score == 35, honest  # the same tests pass honest code


def test_cpu_limit_cannot_be_stretched_by_catching_sigxcpu():
    """Before: RLIMIT_CPU's soft limit only sends SIGXCPU; a sample that ignored it computed on up to the
    hard limit (one more second) and, ending before it, passed with more CPU than `cpuSeconds`. Now the
    supervisor reads the sample's CPU time when it reaps it: over the limit is a `cpu` limit."""
    code = ("import signal, time\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
            "while time.process_time() < 1.6:\n    pass\na, b = map(int, input().split())\nprint(a + b)")
    [o] = sandbox.run([sandbox.Job("io", code, stdin="2 3\n")], sandbox.Limits(cpu_s=1, timeout_s=30))
    assert o.limit == "cpu", o
    r = grade(code_grader(cpuSeconds=1, timeoutSeconds=30), fenced(code), ADD_IO)
    assert r.failed, r
    slow_add = ("import signal, time\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                "def add(a, b):\n    while time.process_time() < 1.6:\n        pass\n    return a + b")
    r = grade(code_grader(cpuSeconds=1, timeoutSeconds=30), fenced(slow_add), ADD_TESTS)
    assert r.failed, r  # assert-style: the tests ran to the end, but on more CPU than allowed


def test_output_floods_are_not_kept_by_the_trainer():
    """Before: every I/O case's stdout (up to 1 MiB each) was kept in the trainer until the whole batch was
    graded: a policy that prints ~1 MiB of garbage per case (a common degenerate RL behaviour, or on
    purpose) made the trainer hold samples x cases MiB (1,536 jobs: 1.5 GiB) on top of the model. Now the
    trainer compares each case's output with the expected one as its result arrives (expected outputs
    still never leave the trainer) and keeps only a short head of it."""
    flood = "import sys\nsys.stdout.write('7' * 1000000 + '\\n')"
    outs = sandbox.run([sandbox.Job("io", flood, expected="5\n"), sandbox.Job("io", "print(5)", expected="5\n")],
                       sandbox.Limits())
    assert [o.matched for o in outs] == [False, True], outs
    assert all(len(o.stdout) <= 4096 for o in outs), [len(o.stdout) for o in outs]
    rs = grade_batch(code_grader(), [fenced(flood), fenced("a, b = map(int, input().split())\nprint(a + b)")], [ADD_IO] * 2)
    assert [r.score for r in rs] == [15, 35], rs


def test_many_entries_under_a_large_scratch_limit():
    """Before: with a large `scratchMiB` (up to 64 GiB), a sample made hundreds of thousands of empty
    directories; every 20 ms poll walked them all, the supervisor fell behind, and a sample with a 10 s
    limit held it for 28 s (the trainer's deadline allows `timeoutSeconds` + 3 s per sample: the rest of
    its shard would have been lost). Now more than 10,000 entries stop the sample, and a slow walk makes
    the polls rarer.

    Then, on a busy machine (other processes' fsyncs on the same ext4 disk), the supervisor removed the
    stopped sample's 11,000-17,000 directories before answering, one `rmdir` at a time at 2-4 ms each:
    results came after 25-41 s, or never (the trainer's deadline passed and it killed the supervisor,
    leaving the directories behind). Now the tree is moved aside and removed in the background by
    parallel workers; the fixture waits for that removal to finish."""
    code = "import os\nn = 0\nwhile True:\n    os.mkdir('d%d' % n)\n    n += 1\n    if n % 1000 == 0:\n        print(n, flush=True)"
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(scratch_mib=65536, timeout_s=10))
    assert not o.error, o  # the result came, within the trainer's deadline
    # stopped by the entry limit; a machine too slow to make 10,000 directories in 10 s (a busy 2-core
    # one makes 4,000-5,000) stops it by time
    assert o.limit in ("scratch", "wall"), o
    if o.limit == "scratch":  # only past 10,000 entries: after the sample said 10000
        assert "10000" in o.stdout.split(), o
    assert o.wall_s <= 10 + 3, o  # the trainer's deadline per sample (`timeoutSeconds` + 3 s)


def test_the_trash_of_a_dead_supervisor_is_removed_by_the_next():
    """Before: a supervisor killed while it removed a stopped sample's tree (the trainer's deadline passed
    during a slow removal, or the trainer ended) left the rest in /tmp for good: 7 such directories with
    1,000-33,000 entries each were found after a few runs. Now each supervisor holds a lock on its trash
    directory for its life, and one that starts takes over the trash nobody holds: moved aside before it
    answers, removed in the background (the fixture waits for that), without following links."""
    root = tempfile.gettempdir()
    keep = tempfile.mkdtemp(prefix="perennial-keep-", dir=root)  # outside: a link in the trash points here
    open(os.path.join(keep, "f"), "w").close()
    dead = tempfile.mkdtemp(prefix="perennial-rm-", dir=root)  # as a killed supervisor leaves it
    tree = os.path.join(dead, "7")
    os.mkdir(tree)
    d = tree
    for i in range(40):
        os.mkdir(os.path.join(d, "d"))
        open(os.path.join(d, f"f{i}"), "w").close()
        os.symlink(keep, os.path.join(d, "link"))
        d = os.path.join(d, "d")
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), UID, UID)
    os.chown(tree, UID, UID)
    os.chmod(os.path.join(tree, "d"), 0)  # the sample's own modes
    held = tempfile.mkdtemp(prefix="perennial-rm-", dir=root)  # a live supervisor's
    os.mkdir(os.path.join(held, "1"))
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        sandbox.close_all()
        [o] = sandbox.run([sandbox.Job("io", "print(1)")], sandbox.Limits())  # a new supervisor starts
        assert o.stdout == "1\n", o
        assert not os.path.exists(dead), os.listdir(dead)
        assert os.listdir(held) == ["1"], "the trash of a live supervisor is left alone"
        assert not _scratch_dirs_after_removal(UID), "the dead supervisor's trash was not removed"
        assert os.listdir(keep) == ["f"], "the removal followed a link out of the trash"
    finally:
        os.close(fd)
        shutil.rmtree(held, ignore_errors=True)
        shutil.rmtree(keep, ignore_errors=True)
        if os.path.exists(dead):
            subprocess.run(["chmod", "-R", "u+rwx", dead], check=False)
            shutil.rmtree(dead, ignore_errors=True)


def test_the_scratch_of_a_killed_supervisors_sample_is_removed():
    """Before: a supervisor killed while a sample ran (the OOM killer, the trainer's deadline) left that
    sample's scratch directory in /tmp for good: one per run of `test_a_killed_supervisor_leaves_no_sample_running`.
    Now a sample's scratch is named after its supervisor's trash, and the supervisor that takes over the
    trash takes it too (at its start: before it answers)."""
    code = "import os, time\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nprint('ready', flush=True)\ntime.sleep(600)"
    sandbox.run([sandbox.Job("io", "print(0)")], sandbox.Limits(timeout_s=3), parallel=1)
    sups = list(sandbox._pool.values())
    threading.Timer(1.5, lambda: [sup.proc.kill() for sup in sups]).start()
    sandbox.run([sandbox.Job("io", code)], sandbox.Limits(timeout_s=3), parallel=1)  # killed, retried once
    sandbox.run([sandbox.Job("io", "print(1)")], sandbox.Limits(timeout_s=4), parallel=1)  # a new supervisor
    left = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "perennial-sample-*"))
            if os.path.exists(d) and os.lstat(d).st_uid == UID]
    assert not left, left


def test_removal_does_not_follow_a_link_put_in_place_of_the_scratch():
    """Before: a sample without Landlock (a kernel without it: it can write where its uid can) replaced its
    scratch directory (in sticky /tmp, its own) with a link to a directory of root's; the supervisor, as
    root, made what it had to remove writable for itself (`chmod 0700`) through the link: any directory
    or file on the machine lost its permissions for everyone else. Now what is removed is never reached
    through a link."""
    target = tempfile.mkdtemp(prefix="perennial-keep-")
    os.chmod(target, 0o755)
    code = f"import os\nhere = os.getcwd()\nos.chdir('/')\nos.rmdir(here)\nos.symlink({target!r}, here)\nprint('ok')"
    try:
        [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(layers_off=("landlock",)))
        assert o.stdout == "ok\n", o
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755, oct(os.stat(target).st_mode)
    finally:
        os.rmdir(target)


def test_a_deeply_nested_record_does_not_kill_the_supervisor():
    """Before: assert-style code wrote `[` x 60,000 on its record descriptor (fd 3, open for the
    harness's result); the supervisor's json.loads raised RecursionError (not ValueError), the supervisor
    died, and every sample of its shard lost its result, on the retry too. Now such a record is ignored."""
    code = "import os\nos.write(3, b'[' * 60000 + b'\\n')\ndef add(a, b):\n    return a + b"
    outs = sandbox.run([sandbox.Job("asserts", code, tests="assert add(1, 2) == 3"), sandbox.Job("io", "print(5)"),
                        sandbox.Job("io", "print(6)")], sandbox.Limits(), parallel=1)
    assert [o.stdout for o in outs[1:]] == ["5\n", "6\n"], outs
    assert outs[0].passed, outs[0]  # the forged line is ignored; the harness's own record still counts


def test_nested_record_values_do_not_reach_the_trainer():
    """Before: the `failed` field of an assert-style record (written by the sample on fd 3) went to the
    trainer as any JSON value: 985 nested lists passed the supervisor's json.loads but not the trainer's,
    called deeper in its stack (here 60 frames, as inside a training loop): `sandbox.run` raised
    RecursionError, so every sample of the batch scored the failureScore. Now the supervisor passes on
    only the harness's own words and the trainer skips a line it cannot decode."""
    d = 985
    code = (f"import os\nos.write(3, b'{{\"failed\": ' + b'[' * {d} + b']' * {d} + b'}}\\n')\nos._exit(1)\n"
            "def add(a, b):\n    return a + b")

    def deep(n: int):
        if n:
            return deep(n - 1)
        return sandbox.run([sandbox.Job("asserts", code, tests="assert add(1, 2) == 3"), sandbox.Job("io", "print(5)")],
                           sandbox.Limits(), parallel=1)

    a, b = deep(60)
    assert b.stdout == "5\n", b
    assert not a.passed and a.failed == "error", a


@pytest.mark.parametrize("code,tests", [
    ("all = lambda *a, **k: True\ndef add(a, b):\n    return 0",
     "assert all(add(a, b) == c for a, b, c in [(2, 3, 5), (-1, 1, 0)])"),
    ("abs = lambda x: 0\ndef add(a, b):\n    return 0", "assert abs(add(2, 3) - 5) < 1e-9\nassert abs(add(-1, 1)) < 1e-9"),
    ("def isinstance(*a):\n    return True\ndef add(a, b):\n    return 0", "assert isinstance(add(2, 3), str)"),
], ids=["all", "abs", "isinstance"])
def test_code_cannot_shadow_the_builtins_of_the_tests(code, tests):
    """Before: the tests ran in the code's namespace, whose globals come before the builtins, so code that
    defined `all`, `abs` or `isinstance` answered the tests' checks itself (35 points for `return 0`).
    Now a global of the code that bears a built-in's name is not seen by the tests."""
    r = grade(code_grader(), fenced(code), {"tests": tests})
    assert r.score < 35, r


def test_a_python_grader_result_cannot_sink_the_batch():
    """Before: a `grade()` (here: one that lets the completion steer it) whose process wrote its own result
    record with an integer too large for a float made the trainer's finiteness check raise OverflowError:
    every sample of the batch scored the failureScore, against the README's "one sample cannot affect
    another's score". Now the supervisor passes on only values that are numbers a float can hold."""
    source = ("import os\ndef grade(sample, item):\n    if 'BOOM' in sample['output_text']:\n"
              "        os.write(3, b'{\"value\": 1' + b'0' * 400 + b'}\\n')\n        os._exit(0)\n    return 0.5")
    g = Grader.model_validate({"name": "py", "type": "Python", "python": {"source": source}})
    rs = grade_batch(g, ["BOOM", "an honest answer"], [{}, {}])
    assert rs[1].score == 0.5 and not rs[1].failed, rs
    assert rs[0].failed, rs


# ----------------------------------------------------------------------------- a sample's raw memory


SCAN = r'''
import ctypes, gc, os, sys
A = sys.stdin.readline().strip().encode()  # the marker's two halves, never joined here
B = sys.stdin.readline().strip().encode()
OWN = b"-own-" + B
mine = ctypes.create_string_buffer(A + OWN)  # the positive control: the scan must find this one
libc = ctypes.CDLL(None, use_errno=True)
libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
libc.malloc.argtypes = [ctypes.c_size_t]
PAGE, CHUNK = 4096, 1 << 16
r, w = os.pipe()


def read(addr, n):
    """The bytes readable at `addr` (up to n): write(2) into a pipe faults (EFAULT) on an unreadable page
    instead of crashing the process, and stops at the first one (/proc/self/maps is closed by Landlock)."""
    try:
        k = os.write(w, (ctypes.c_char * n).from_address(addr))
    except OSError:
        return b""
    out = b""
    while len(out) < k:
        out += os.read(r, k - len(out))
    return out


# seeds: every object the collector knows, the heap's break, fresh allocations of every size class
# (small: the heap; large: mmap'd near the libraries), a libc function and the control buffer
seeds = {id(o) for o in gc.get_objects()} | {id(m) for m in list(sys.modules.values())}
seeds |= {libc.sbrk(0) - 1, ctypes.addressof(mine), ctypes.cast(libc.malloc, ctypes.c_void_p).value, id(A), id(sys.stdin)}
seeds |= {libc.malloc(n) for n in (16, 600, 5000, 200000, 2 << 20)}
pages = sorted({s & ~(PAGE - 1) for s in seeds if s})
GAP = 64  # unreadable pages crossed (guard pages between mappings) before a region ends
regions = []


def covered(p):
    return any(lo <= p < hi for lo, hi in regions)


for p in pages:
    if covered(p) or not read(p, 1):
        continue
    lo = p
    miss = 0
    q = p - PAGE
    while miss < GAP and q > 0 and not covered(q):
        if read(q, 1):
            lo, miss = q, 0
        else:
            miss += 1
        q -= PAGE
    hi = p + PAGE
    miss = 0
    q = hi
    while miss < GAP and q < (1 << 47) and not covered(q):
        if read(q, 1):
            hi, miss = q + PAGE, 0
        else:
            miss += 1
        q += PAGE
    regions.append((lo, hi))

hits, own, scanned = [], 0, 0
keep = len(A) + len(OWN)
for lo, hi in regions:
    tail, pos = b"", lo
    while pos < hi:
        d = read(pos, min(CHUNK, hi - pos))  # stops at the first unreadable page (a guard page crossed above)
        if not d:
            tail, pos = b"", pos + PAGE
            continue
        pos += len(d)
        scanned += len(d)
        buf = tail + d
        i = buf.find(A)
        while i >= 0:
            rest = buf[i + len(A):i + keep]
            if rest[:len(B)] == B:
                hits.append(buf[max(0, i - 24):i + keep + 24])
            elif rest == OWN:
                own += 1
            i = buf.find(A, i + 1)
        tail = buf[-keep:]
print("own", own, "scanned_mib", scanned >> 20, "regions", len(regions), "hits", len(hits))
for h in hits[:10]:
    print("hit", h)
'''


def test_a_sample_finds_no_sibling_in_its_raw_memory():
    """Before: a sample was a fork of the supervisor, whose memory had held the other samples' code and
    input (the batch's lines in its stdin buffer, freed JSON strings) and earlier samples' stdout: a
    sample that read its own raw memory with ctypes (probing pages by write(2) into a pipe: EFAULT, not a
    crash) found them, and could copy a sibling's answer. Now samples are forked by a zygote the supervisor
    forked before it read any job, and each sample receives its own job through a pipe after the fork:
    nothing of another sample was ever in its memory. Deterministic: any hit is a leak. The scan must
    find its own control marker (it reads the whole of every region it reaches)."""
    import secrets

    token = secrets.token_hex(8)
    a, b = f"PRNL{token[:8]}", f"{token[8:]}SIB"  # a sibling's marker is a + b; only the halves reach the scan
    marker = a + b

    def sibling(k: int) -> sandbox.Job:
        return sandbox.Job("io", f"# {marker} code {k}\nprint('{marker}' + ' out {k}')\nprint(input())",
                           stdin=f"{marker} stdin {k}\n")

    jobs = [sibling(0), sibling(1), sandbox.Job("io", SCAN, stdin=f"{a}\n{b}\n"), sibling(2), sibling(3)]
    outs = sandbox.run(jobs, sandbox.Limits(timeout_s=60, cpu_s=60), parallel=1)
    for k, o in zip((0, 1, 3, 4), (outs[0], outs[1], outs[3], outs[4])):
        assert o.exit_code == 0 and marker in o.stdout, o
    scan = outs[2]
    assert scan.exit_code == 0, scan
    first = scan.stdout.splitlines()[0].split()
    stats = dict(zip(first[::2], map(int, first[1::2])))
    assert stats["own"] >= 1 and stats["scanned_mib"] >= 4, scan.stdout  # the scan reads memory: it finds its own marker
    assert stats["hits"] == 0, scan.stdout[:3000]
