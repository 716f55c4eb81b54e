"""What the sandbox attack suites share: the classic code rubric, its honest tests, and the processes of a uid."""

from __future__ import annotations

import os

from perennial.api import Grader

RUBRIC = {"formatPoints": "5", "compilePoints": "10", "testPoints": "20"}
ADD_TESTS = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
ADD_IO = {"io_tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}]}


def code_grader(**limits) -> Grader:
    return Grader.model_validate({"name": "code", "type": "Code", "code": dict(RUBRIC, limits=limits)})


def fenced(src: str) -> str:
    return f"```python\n{src}\n```"


def uid_pids(uid: int) -> list[int]:
    """Every process running as `uid`."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(p))
                        break
        except OSError:
            pass
    return pids
