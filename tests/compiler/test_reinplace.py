"""compiler/reinplace: a functional update of a graph input followed by AOTAutograd's copy_
epilogue becomes the in-place op (Before/Expected graphs compared structurally, and run), and is
left alone whenever a later reader would see the input change under it."""

import torch
import torch.fx as fx

from attnopt.compiler.reinplace import reinplace_input_updates

aten = torch.ops.aten


def ops(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_index_put_with_epilogue_becomes_index_put_():
    def before(pool, idx, rows):
        new = aten.index_put.default(pool, [idx], rows)
        total = aten.sum.default(new)
        aten.copy_.default(pool, new)
        return total

    def expected(pool, idx, rows):
        new = aten.index_put_.default(pool, [idx], rows)
        return aten.sum.default(new)

    gm = fx.symbolic_trace(before)
    assert reinplace_input_updates(gm) == 1
    assert ops(gm) == ops(fx.symbolic_trace(expected))

    pool, idx, rows = torch.zeros(6, 2), torch.tensor([1, 4]), torch.ones(2, 2)
    want = pool.clone().index_put_((idx,), rows)
    address = pool.data_ptr()
    assert gm(pool, idx, rows) == 4
    assert torch.equal(pool, want) and pool.data_ptr() == address


def test_a_later_reader_of_the_old_value_keeps_the_copy():
    def before(pool, idx, rows):
        new = aten.index_put.default(pool, [idx], rows)
        old = aten.view.default(pool, [-1])  # a view, read after the update
        total = aten.add.Tensor(aten.sum.default(new), aten.sum.default(old))
        aten.copy_.default(pool, new)
        return total

    gm = fx.symbolic_trace(before)
    assert reinplace_input_updates(gm) == 0
    assert aten.copy_.default in ops(gm)
    pool = torch.zeros(6, 2)
    assert gm(pool, torch.tensor([1]), torch.ones(1, 2)) == 2  # the old pool summed to 0


def test_an_update_reading_its_own_input_elsewhere_is_left_alone():
    def before(pool, idx):
        new = aten.index_put.default(pool, [idx], aten.view.default(pool, [6, 2]))
        aten.copy_.default(pool, new)
        return new

    gm = fx.symbolic_trace(before)
    assert reinplace_input_updates(gm) == 0
