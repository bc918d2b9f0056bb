import gc
import weakref

from mobile_vla.serve.heap import freeze_long_lived_heap


class _Node:
    def __init__(self):
        self.self_ref = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_keeps_survivors_out_of_collections_and_frees_old_cycles_on_the_next_call():
    try:
        old_model = _Node()
        alive = weakref.ref(old_model)
        freeze_long_lived_heap()
        assert gc.get_freeze_count() > 0
        del old_model  # dropped at a hot swap while frozen: a plain collection cannot see it
        gc.collect()
        assert alive() is not None
        freeze_long_lived_heap()  # the next (re)load unfreezes first, so the cycle is freed
        assert alive() is None
    finally:
        gc.unfreeze()
