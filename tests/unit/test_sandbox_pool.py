"""The trainer's supervisors: kept between batches, shared out per CPU, never closed while in use."""

from __future__ import annotations

from perennial_trainer import sandbox


def test_supervisors_are_reused_and_a_full_pool_never_closes_one_in_use(monkeypatch):
    monkeypatch.setattr(sandbox, "_POOL_MAX", 2)
    jobs = [sandbox.Job("io", "print(input())", stdin=f"{i}\n") for i in range(12)]
    for timeout in (5, 6, 5):  # three configurations, each spread over 4 supervisors
        outs = sandbox.run(jobs, sandbox.Limits(timeout_s=timeout), parallel=4)
        assert [o.stdout for o in outs] == [f"{i}\n" for i in range(12)], [o.error for o in outs]
    pids = {sup.proc.pid for sup in sandbox._pool.values()}
    sandbox.run(jobs, sandbox.Limits(timeout_s=5), parallel=4)
    assert {sup.proc.pid for sup in sandbox._pool.values()} == pids, "the same supervisors served the next batch"


def test_a_dead_supervisor_is_replaced():
    sandbox.close_all()
    jobs = [sandbox.Job("io", "print(2)")]
    assert sandbox.run(jobs, sandbox.Limits(), parallel=1)[0].stdout == "2\n"
    [sup] = sandbox._pool.values()
    sup.proc.kill()
    sup.proc.wait()
    outs = sandbox.run(jobs * 3, sandbox.Limits(), parallel=1)
    assert [o.stdout for o in outs] == ["2\n"] * 3


def test_a_supervisor_dying_mid_batch():
    """The trainer's reads are bounded: a supervisor killed while its samples run (by the OOM killer,
    say) has its batch run once more on a fresh one; killed again, the samples get error outcomes
    at once, and the next batch still gets a fresh supervisor."""
    import threading

    jobs = [sandbox.Job("io", "import time\ntime.sleep(1)\nprint(1)")] * 2
    sandbox.close_all()
    sandbox.run([sandbox.Job("io", "print(0)")], sandbox.Limits(), parallel=1)
    [sup] = sandbox._pool.values()
    threading.Timer(0.5, sup.proc.kill).start()
    assert [o.stdout for o in sandbox.run(jobs, sandbox.Limits(), parallel=1)] == ["1\n"] * 2

    stop = threading.Event()

    def kill_every_supervisor():
        while not stop.wait(0.2):
            for s in list(sandbox._pool.values()):
                if s.alive():
                    s.proc.kill()

    killer = threading.Thread(target=kill_every_supervisor)
    killer.start()
    try:
        outs = sandbox.run(jobs, sandbox.Limits(timeout_s=20), parallel=1)
    finally:
        stop.set()
        killer.join()
    assert all(o.error.startswith("sandbox supervisor ended early") for o in outs), outs
    assert sandbox.run([sandbox.Job("io", "print(3)")], sandbox.Limits(), parallel=1)[0].stdout == "3\n"
