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

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None
