"""The reward sandbox under attack: one test per attack found in issue 11, plus the reward hacks known
from RL-for-code work. Each attack must earn no unearned points, leave nothing running, and the trainer
(this process, and a same-uid decoy standing in for the pod's other processes) keeps going.

Untrusted code runs as a non-root uid (``PERENNIAL_SANDBOX_UID``), as in a pod; the secrets and the
decoy belong to that same uid, so file permissions do not protect them: only the sandbox's layers do.
`test_kernel_layers` reports which layers this kernel provides; nothing is skipped when one is missing
(the attacks it should stop then fail loudly).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings

import pytest
from perennial_trainer import sandbox
from perennial_trainer.graders import grade, grade_batch
from sandbox_support import ADD_IO, ADD_TESTS, RUBRIC, code_grader, fenced, uid_pids

UID = 47011  # no other process on the machine runs as this uid: anything left running under it is ours


@pytest.fixture(scope="module")
def world():
    """The pod around the sandbox: secrets owned by the sandbox's uid (mode 0600), a same-uid 'launcher'
    with a credential in its environment, a TCP listener on loopback that records every connection."""
    base = tempfile.mkdtemp(prefix="perennial-attack-")
    os.chmod(base, 0o755)
    workdir = os.path.join(base, "trainer-workdir")
    secrets = os.path.join(base, "secrets", "judge-key")
    os.makedirs(workdir)
    os.makedirs(secrets)
    files = {os.path.join(workdir, "secret.txt"): "workdir-secret-0600",
             os.path.join(secrets, "token"): "sk-judge-secret",
             os.path.join(workdir, "expected.json"): json.dumps({"outputs": ["5\n", "0\n"]})}
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    for root, dirs, fs in os.walk(base):
        for n in dirs + fs:
            os.chown(os.path.join(root, n), UID, UID)
        for n in fs:
            os.chmod(os.path.join(root, n), 0o600)
    decoy = subprocess.Popen(["/bin/sleep", "3600"], user=UID, group=UID, extra_groups=[],
                             env={"AWS_SECRET_ACCESS_KEY": "launcher-env-secret"}, start_new_session=True)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn.recv(100))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    old = os.environ.get("PERENNIAL_SANDBOX_UID")
    os.environ["PERENNIAL_SANDBOX_UID"] = str(UID)
    w = {"base": base, "workdir": workdir, "secrets": os.path.dirname(secrets), "decoy": decoy.pid,
         "port": listener.getsockname()[1], "accepted": accepted, "trainer": os.getpid()}
    yield w
    if old is None:
        os.environ.pop("PERENNIAL_SANDBOX_UID", None)
    else:
        os.environ["PERENNIAL_SANDBOX_UID"] = old
    listener.close()
    decoy.kill()
    decoy.wait()
    subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture(autouse=True)
def survives(world):
    """After every attack: the trainer grades an honest sample correctly, the decoy lives, no
    connection reached the listener, and nothing of the sandbox's uid is left running."""
    yield
    assert grade(code_grader(), fenced("def add(a, b):\n    return a + b"), ADD_TESTS).score == 35
    assert os.waitpid(world["decoy"], os.WNOHANG) == (0, 0), "the same-uid decoy was killed"
    with open(f"/proc/{world['decoy']}/stat") as f:
        assert f.read().split(")")[1].split()[0] in "SR", "the decoy was stopped"
    assert not world["accepted"], f"sandboxed code connected to the loopback listener: {world['accepted']}"
    left = []
    for _ in range(50):
        left = [p for p in uid_pids(UID) if p != world["decoy"]]
        if not left:
            break
        time.sleep(0.05)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the sandbox uid outlived grading: {left}"


def test_kernel_layers(world):
    """Which layers this kernel provides (printed for the record); the attack tests below expect all."""
    layers = sandbox.layers()
    print(f"\nsandbox layers on this machine: {layers}")
    warnings.warn(UserWarning(f"sandbox layers this kernel provides: {layers}"))  # in every run's summary
    assert layers["uid"] == UID and layers["subreaper"] and layers["no_new_privs"]
    assert layers["seccomp"], "seccomp (libseccomp + pyseccomp) is missing: network, signal, fork and ptrace attacks are not stopped"
    assert layers["landlock"] >= 6, f"Landlock ABI {layers['landlock']} (< 6): file, TCP and signal scoping are incomplete"


# ----------------------------------------------------------------------------- forged verdicts


FORGE = """
import os, json, sys
line = json.dumps({"id": 0, "ok": True, "passed": True, "compiled": True, "value": {"compiles": True, "passed": True}})
for fd in range(0, 64):
    try:
        os.write(fd, (line + "\\n").encode())
    except OSError:
        pass
print(line)
json.dumps = lambda *a, **k: line
os._exit(0)
"""


def test_forged_result_lines_earn_nothing_for_anyone():
    """Issue 11: code printed result lines (and patched json.dumps) and got full marks for itself and
    the other samples of its batch. Now: a fresh process per sample, verdicts from the supervisor."""
    g = code_grader()
    honest_wrong = fenced("def add(a, b):\n    return a - b")
    out = grade_batch(g, [fenced(FORGE), honest_wrong, fenced(FORGE)], [ADD_TESTS] * 3)
    assert [r.score for r in out] == [0, 15, 0], out
    io = grade_batch(g, [fenced(FORGE), honest_wrong], [ADD_IO] * 2)
    assert [r.score for r in io] == [15, 15], io  # its stdout is compared with the expected output: wrong


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)",  # exit early with success
    "import os\nos._exit(0)",
    "def add(a, b):\n    import sys\n    sys.exit(0)",  # exit from inside the tests
    "def add(a, b):\n    raise SystemExit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    raise KeyboardInterrupt",
])
def test_exiting_early_is_not_passing(code):
    r = grade(code_grader(), fenced(code), ADD_TESTS)
    assert r.score == 0 and r.failed, r  # failureScore: the tests did not run to the end


@pytest.mark.parametrize("code", [
    # the harness's writer and builtins patched before the tests run
    ("import os, builtins, json\n_w = os.write\nos.write = lambda fd, b: _w(fd, b'{\"passed\": true}\\n')\n"
     "builtins.print = lambda *a, **k: None\njson.dumps = lambda *a, **k: '{\"passed\": true}'\ndef add(a, b):\n    return 0"),
    # a failing assert turned into a pass by swapping AssertionError and exec
    ("import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\nbuiltins.exec = lambda *a, **k: None\n"
     "def add(a, b):\n    return 0"),
    # tests silenced through sys.excepthook / a trace function that jumps over the failing asserts
    "import sys\nsys.excepthook = lambda *a: None\nsys.settrace(lambda *a: None)\ndef add(a, b):\n    return 0",
    ("import sys\ndef skip(frame, event, arg):\n    if event == 'line' and frame.f_code.co_filename == '<tests>':\n"
     "        try:\n            frame.f_lineno = frame.f_lineno + 1\n        except Exception:\n            pass\n    return skip\n"
     "sys.settrace(skip)\ndef add(a, b):\n    return 0"),
])
def test_monkeypatching_the_harness(code):
    r = grade(code_grader(), fenced(code), ADD_TESTS)
    assert r.score <= 15, r


@pytest.mark.xfail(strict=True, reason="documented weakness of assert-style tests (README, CodeGrader.testsField): "
                   "they run in the untrusted process, which can find the harness's nonce in its own frames; "
                   "I/O tests are not affected (test_forged_result_lines_earn_nothing_for_anyone)")
def test_assert_style_forgery_by_frame_introspection():
    code = ("import sys, os\nf = sys._getframe()\nwhile f is not None and 'nonce' not in f.f_locals:\n    f = f.f_back\n"
            "if f is not None:\n    f.f_locals['report']({'passed': f.f_locals['nonce']})\n    os._exit(0)\n"
            "def add(a, b):\n    return 0")
    assert grade(code_grader(), fenced(code), ADD_TESTS).score <= 15


def test_always_equal_object():
    """An object equal to everything: fooled assert-style tests (`assert add(2, 3) == 5`); now each
    `assert <expr> == <literal>` compares exact built-in values, and I/O tests compare bytes outside."""
    code = ("class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
            "    def __hash__(self): return 0\n    def __str__(self): return '5'\n    def __bool__(self): return True\n"
            "def add(a, b):\n    return Any()\nprint(Any())\nprint(Any())")
    assert grade(code_grader(), fenced(code), ADD_TESTS).score == 15
    io = grade(code_grader(), fenced(code), ADD_IO)
    assert io.score == 15, io  # '5' for both cases: the second expects 0


def test_reading_expected_outputs(world):
    """Expected outputs are not in the sandbox: not in its memory, not readable from the dataset file,
    the trainer's /proc files or memory, the supervisor's."""
    code = f"""
import os, gc, sys
found = []
paths = ["{world['workdir']}/expected.json", "/proc/{world['trainer']}/cmdline", "/proc/{world['trainer']}/environ",
         "/proc/{world['trainer']}/mem", "/proc/%d/cmdline" % os.getppid(), "/proc/%d/mem" % os.getppid()]
for p in paths:
    try:
        found.append(open(p, "rb").read(4096))
    except Exception:
        pass
for o in gc.get_objects():
    if isinstance(o, dict):
        for v in list(o.values()):  # this module's own globals are among them: `v` is new the first time
            if isinstance(v, str) and "EXPECTED-MARKER" in v:
                found.append(v)
data = sys.stdin.read()
print("FOUND" if found else "nothing", len(found))
"""
    item = {"io_tests": [{"input": "x\n", "output": "EXPECTED-MARKER\n"}]}
    r = grade(code_grader(), fenced(code), item)
    assert r.score == 15, r
    [o] = sandbox.run([sandbox.Job("io", code, stdin="x\n")], sandbox.Limits())
    assert o.stdout.strip() == "nothing 0", o


# ----------------------------------------------------------------------------- the trainer and its pod


def test_signals_to_the_trainer_and_its_pod(world):
    """Issue 11: SIGINT killed the trainer, SIGSTOP hung it, SIGKILL ended it. Now kill() reaches only
    the sample's own process group (seccomp) and its own Landlock domain."""
    targets = [world["trainer"], world["decoy"], 1, -1, -world["decoy"]]
    code = f"""
import os, signal, ctypes
libc = ctypes.CDLL(None, use_errno=True)
for pid in {targets} + [os.getppid()]:
    for sig in (signal.SIGSTOP, signal.SIGINT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        libc.kill(pid, sig)
        libc.syscall(200, pid, sig)          # tkill
        libc.syscall(234, pid, pid, sig)     # tgkill
        libc.syscall(129, pid, sig, None)    # rt_sigqueueinfo
def add(a, b):
    return 0
"""
    out = grade_batch(code_grader(), [fenced(code), fenced("def add(a, b):\n    return a + b")], [ADD_TESTS] * 2)
    assert [r.score for r in out] == [15, 35], out
    for off in (("seccomp",), ("landlock",)):  # each layer alone still protects the same-uid decoy
        [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(layers_off=off))
        assert o.exit_code == 0, (off, o)
        assert os.waitpid(world["decoy"], os.WNOHANG) == (0, 0), f"the decoy was killed with {off} off"


def test_network_is_closed(world):
    """Issue 11: code reached a TCP listener on 127.0.0.1. Both layers are checked on their own."""
    code = f"""
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
addr = struct.pack("=H", 2) + struct.pack("!H", {world['port']}) + bytes([127, 0, 0, 1]) + bytes(8)  # sockaddr_in
for family in (2, 10, 16, 1):
    fd = libc.socket(family, 1, 0)
    if fd >= 0 and family == 2:
        libc.connect(fd, addr, 16)
        libc.send(fd, b"escaped", 7, 0)
print(ctypes.get_errno())
"""
    for off in ((), ("seccomp",), ("landlock",)):
        [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(layers_off=off))
        assert o.exit_code == 0, o
    time.sleep(0.2)
    assert not world["accepted"]


def test_files_of_the_pod_are_out_of_reach(world):
    """Issue 11: /etc/passwd, a 0600 secret in the trainer's working directory, the judge's key files and
    /proc/<launcher>/environ were read (same uid); files were written outside the scratch directory."""
    outside = os.path.join(world["base"], "planted.txt")
    code = f"""
import os
got = []
for p in ["/etc/passwd", "{world['workdir']}/secret.txt", "{world['secrets']}/judge-key/token",
          "/proc/{world['decoy']}/environ", "/proc/{world['trainer']}/environ", "/proc/self/environ"]:
    try:
        got.append(open(p).read())
    except OSError:
        pass
for p in ["{outside}", "/tmp/perennial-planted.txt", "{world['workdir']}/planted.txt"]:
    try:
        open(p, "w").write("x")
        got.append("wrote " + p)
    except OSError:
        pass
print(repr(got))
"""
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits())
    assert o.exit_code == 0 and o.stdout.strip() == "[]", o
    assert not os.path.exists(outside) and not os.path.exists("/tmp/perennial-planted.txt")
    # with seccomp off, Landlock alone still holds
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(layers_off=("seccomp",)))
    assert o.stdout.strip() == "[]", o


def test_ptrace_and_process_memory(world):
    """ptrace, another process's memory and descriptors: seccomp denies the calls; Landlock alone still
    denies them for any process outside the sample's domain (EPERM, where an allowed read of a bad
    address would be EFAULT)."""
    code = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local, remote = iovec(ctypes.cast(buf, ctypes.c_void_p), 8), iovec(0x1000, 8)
out = [libc.ptrace(16, {world['decoy']}, None, None), ctypes.get_errno()]
out += [libc.syscall(310, {world['decoy']}, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), ctypes.get_errno()]
fd = libc.syscall(434, {world['decoy']}, 0)  # pidfd_open, then pidfd_getfd of its stdin
out += [fd, libc.syscall(438, fd, 0, 0) if fd >= 0 else -1]
print(*out)
"""
    for off in ((), ("seccomp",)):
        [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(layers_off=off))
        ptrace, _, vm, vm_errno, pidfd, stolen = map(int, o.stdout.split())
        assert ptrace == -1 and vm == -1 and vm_errno == 1 and stolen == -1, (off, o.stdout)
        if not off:
            assert pidfd == -1


# ----------------------------------------------------------------------------- resources and escapes


def test_filling_the_disk():
    """Issue 11: 33 x 63 MiB files filled the disk. A file is capped by `fileSizeMiB` (RLIMIT_FSIZE) and
    the scratch directory by `scratchMiB` (polled): the sample is killed, its directory removed."""
    code = ("import os\nchunk = b'x' * (1 << 20)\nfor i in range(33):\n    with open(f'f{i}', 'wb') as f:\n"
            "        for _ in range(8):\n            f.write(chunk)\n            f.flush()\n            os.fsync(f.fileno())\n")
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(scratch_mib=32, file_size_mib=16, timeout_s=30))
    assert o.limit == "scratch", o
    [big] = sandbox.run([sandbox.Job("io", "open('big', 'wb').write(b'x' * (20 << 20))")], sandbox.Limits(file_size_mib=16))
    assert big.signal == signal.SIGXFSZ or big.exit_code != 0, big
    r = grade(code_grader(scratchMiB=32), fenced(code + "def add(a, b):\n    return a + b"), ADD_TESTS)
    assert r.score == 0 and r.failed, r


def test_fork_bomb():
    code = "import os\nwhile True:\n    os.fork()"
    r = grade(code_grader(), fenced(code), ADD_TESTS)
    assert r.score == 0 and r.failed, r  # processes: 1 (default): fork fails at once
    r = grade(code_grader(processes=8, timeoutSeconds=3), fenced("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"), ADD_TESTS)
    assert r.score == 0 and r.failed, r


@pytest.mark.parametrize("off", [(), ("seccomp",)], ids=["all-layers", "without-seccomp"])
def test_setsid_daemons_die_with_the_sample(world, off):
    """Issue 11: setsid children outlived grading and connected out 5 s later. With seccomp they cannot
    leave the process group; without it the subreaper supervisor still kills every orphan."""
    code = """
import os, time, ctypes
if os.fork() == 0:
    try:
        os.setsid()
    except OSError:
        pass
    if os.fork() == 0:
        os.close(1)
        time.sleep(3)
        libc = ctypes.CDLL(None)
        libc.socket(2, 1, 0)
        open("/tmp/perennial-daemon-was-here", "w").write("x")
        time.sleep(600)
    os._exit(0)
print("5")
"""
    [o] = sandbox.run([sandbox.Job("io", code)], sandbox.Limits(processes=8, layers_off=off))
    assert o.stdout.strip() == "5" and o.exit_code == 0, o
    time.sleep(3.5)
    assert not os.path.exists("/tmp/perennial-daemon-was-here")


def test_a_killed_supervisor_leaves_no_sample_running():
    """Should a supervisor die (the OOM killer), the samples it was running and their children die too:
    the children by PDEATHSIG, their process groups killed by the trainer (checked by `survives`)."""
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(600)\ntime.sleep(1)\nprint('ok')"
    sandbox.run([sandbox.Job("io", "print(0)")], sandbox.Limits(processes=4), parallel=1)
    sups = list(sandbox._pool.values())
    threading.Timer(0.5, lambda: [s.proc.kill() for s in sups]).start()
    outs = sandbox.run([sandbox.Job("io", code)] * 2, sandbox.Limits(processes=4), parallel=1)
    assert [o.stdout for o in outs] == ["ok\n"] * 2, outs  # run again on a fresh supervisor


def test_pipes_held_open_do_not_hang_grading():
    """Issue 11: a child closing stdout, a grandchild holding stderr hung grading indefinitely."""
    closes = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(600)"
    holds = "import os, time\nif os.fork() == 0:\n    time.sleep(600)\nprint('done')"
    a, b = sandbox.run([sandbox.Job("io", closes), sandbox.Job("io", holds)], sandbox.Limits(timeout_s=2, processes=4))
    assert a.limit == "wall", a
    assert b.limit is None and b.exit_code == 0 and b.stdout == "done\n", b


def test_memory_and_cpu_limits():
    mem, cpu = sandbox.run([sandbox.Job("io", "x = bytearray(4 << 30)"), sandbox.Job("io", "while True: pass")],
                           sandbox.Limits(memory_mib=256, cpu_s=1, timeout_s=60))
    assert mem.exit_code == 1 and "MemoryError" in mem.stderr, mem
    assert cpu.limit == "cpu", cpu


def test_endless_output_is_capped():
    [o] = sandbox.run([sandbox.Job("io", "while True: print('x' * 4096)")], sandbox.Limits(timeout_s=20))
    assert o.limit == "output" and len(o.stdout) <= 1 << 20, (o.limit, len(o.stdout))


def test_require_landlock_refuses_without_it(monkeypatch):
    """Where the kernel lacks Landlock, `requireLandlock` refuses to grade (shown by turning the layer off
    the way a kernel without it reports it)."""
    from perennial.api import RewardSpecSpec
    from perennial_trainer import graders
    from perennial_trainer.errors import TrainerError

    # the supervisor refuses every sample (Landlock turned off stands for a kernel without it)
    outs = sandbox.run([sandbox.Job("io", "print(1)")] * 2, sandbox.Limits(require_landlock=True, layers_off=("landlock",)))
    assert all(o.refused and "Landlock is required" in o.why() for o in outs), outs
    r = grade_batch(code_grader(requireLandlock=True), [fenced("print(1)")], [ADD_IO])[0]
    assert r.score == 15 and not r.failed, r  # with Landlock (this machine) it is graded: wrong output
    # and the trainer refuses the RewardSpec at start
    monkeypatch.setattr(sandbox, "_layers", {"landlock": 0, "seccomp": True})
    spec = RewardSpecSpec.model_validate({"graders": [{"name": "code", "type": "Code", "code": dict(RUBRIC, limits={"requireLandlock": True})}]})
    with pytest.raises(TrainerError) as e:
        graders.check_reward_spec(spec)
    assert e.value.reason == "InvalidRewardSpec" and "Landlock" in str(e.value)
