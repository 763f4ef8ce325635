"""Python's cycle collector during a training run's start-up (lorakit/utils/collector.py)."""

import gc

import pytest

from lorakit.utils import collector


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if was else gc.disable()
    collector._paused = False


def test_paused_start_up_is_frozen_then_collected_again(restore_gc):
    gc.enable()
    gc.unfreeze()
    collector.pause_collector()
    assert not gc.isenabled()
    kept = [object() for _ in range(1000)]  # what start-up builds
    collector.resume_collector()
    assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
    frozen = gc.get_freeze_count()
    collector.resume_collector()  # idempotent
    assert gc.get_freeze_count() == frozen

    class Cycle:
        pass

    a = Cycle()
    a.me = a  # garbage made during training is still collected
    del a
    assert gc.collect() >= 1


def test_a_collector_someone_else_turned_off_stays_off(restore_gc):
    gc.disable()
    frozen = gc.get_freeze_count()
    collector.pause_collector()
    collector.resume_collector()
    assert not gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_burst_s_cyclic_garbage_is_collected_not_frozen(restore_gc):
    """The memory estimate's traced steps leave cycles: freed right after them, while start-up stays paused."""
    import weakref

    gc.enable()
    gc.unfreeze()
    collector.pause_collector()
    before = [object() for _ in range(100)]

    class Node:
        pass

    with collector.garbage_collected():
        node = Node()
        node.me = node
        gone = weakref.ref(node)
        del node
        assert gone() is not None  # paused: nothing collects it during the burst
    assert gone() is None and not gc.isenabled()
    assert gc.get_freeze_count() >= len(before)  # what existed before the burst was frozen, not scanned


def test_a_job_that_ends_before_the_loop_collects_again(restore_gc):
    """--estimate_memory or an error before training: the command's wrapper turns collection back on."""
    gc.enable()
    with pytest.raises(ValueError):
        with collector.paused_start_up():
            assert not gc.isenabled()
            raise ValueError("refused before loading")
    assert gc.isenabled()
