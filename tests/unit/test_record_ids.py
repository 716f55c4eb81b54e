"""Record and response ids: 128 random bits as hex, never repeated, never shared with a fork."""

from __future__ import annotations

import os
import re

from perennial.api.records import FeedbackRecord, random_hex


def test_ids_are_128_random_bits_and_unique() -> None:
    ids = [random_hex() for _ in range(20000)]  # several refills of the 4 KB buffer
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert FeedbackRecord(response_id="chatcmpl-x", type="thumbs", thumbs="up").id.startswith("fb-")


def test_a_forked_child_never_repeats_the_parents_next_ids() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids
        os.write(w, "".join(random_hex() for _ in range(4)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 4096).decode()
    os.close(r)
    parent = "".join(random_hex() for _ in range(4))
    assert len(child) == len(parent) == 128 and child != parent
