"""The long-running processes' garbage-collector settings (perennial.runtime_gc)."""

from __future__ import annotations

import gc

import pytest

from perennial import runtime_gc


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_freezes_what_exists_and_collects_the_young_generation_less_often(restore_gc):
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    runtime_gc.tune()
    assert gc.get_threshold() == (runtime_gc.YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 0


def test_cycles_made_after_tuning_are_still_collected(restore_gc):
    import weakref

    runtime_gc.tune()

    class Node:
        pass

    assert gc.isenabled()
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    # no gc.collect(): the collector must run by itself once enough containers were allocated (it would not,
    # were tune() to disable it or set a threshold of 0)
    keep = [[] for _ in range(3 * runtime_gc.YOUNG_THRESHOLD)]
    assert ref() is None, "a cycle made after tune() was not collected by the collector's own schedule"
    del keep
