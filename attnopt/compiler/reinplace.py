"""Input updates back in place, for graphs run as they are (`inner="eager"`).

AOTAutograd hands over functional graphs: a cache write `pool.index_put_(idx, rows)` arrives as

    new = index_put(pool, idx, rows)      # a fresh copy of the whole pool, rows written
    ...                                   # readers of the updated pool read `new`
    copy_(pool, new)                      # the epilogue: the input takes its new value

Run eagerly, that copies the pool twice per write — per layer and per decoding step, so the
cost grows with the cache's size instead of with the tokens written. Inductor reinplaces this
pattern itself; for the eager inner compiler this pass does: when nothing reads `pool` after
the functional op, the op becomes its in-place variant on `pool` and the epilogue goes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# functional op -> its in-place variant (same arguments, mutates and returns the first)
INPLACE = {
    aten.index_put.default: aten.index_put_.default,
    aten.index_copy.default: aten.index_copy_.default,
    aten.scatter.src: aten.scatter_.src,
    aten.scatter.value: aten.scatter_.value,
    aten.copy.default: aten.copy_.default,
}


def reinplace_input_updates(gm: fx.GraphModule) -> int:
    """Rewrite every `copy_(input, f(input, ...))` epilogue whose `f` has an in-place variant and
    can safely run on the input itself. Returns how many were rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = 0
    for epilogue in list(gm.graph.nodes):
        if epilogue.target is not aten.copy_.default or epilogue.users:
            continue
        target, value = epilogue.args[:2]
        if (target.op != "placeholder" or not isinstance(value, fx.Node)
                or value.target not in INPLACE or value.args[0] is not target
                or not _safe(target, value, epilogue, order)):
            continue
        value.target = INPLACE[value.target]
        gm.graph.erase_node(epilogue)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _safe(target: fx.Node, update: fx.Node, epilogue: fx.Node, order: dict) -> bool:
    """Writing `target` in place at `update` changes what a later reader of it (or of a view of
    it) sees; and an argument of `update` that aliases `target` would be read while written."""
    aliases = _aliases(target)
    readers = {u for a in aliases for u in a.users} - aliases - {update, epilogue}
    if any(order[r] > order[update] for r in readers):
        return False
    if any(order[a] > order[update] for a in aliases - {target}):
        return False
    operands = _node_args(update)[1:]  # the first is `target` itself
    return not any(a in aliases for a in operands)


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _aliases(node: fx.Node) -> set[fx.Node]:
    """`node` and every view of it, transitively (ops whose output aliases their input)."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            schema = getattr(user.target, "_schema", None)
            if user not in seen and schema is not None and schema.returns \
                    and schema.returns[0].alias_info is not None \
                    and not schema.returns[0].alias_info.is_write:
                seen.add(user)
                todo.append(user)
    return seen
