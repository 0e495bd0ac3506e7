"""Rewrites of the converted ONNX graph that keep every output bit for bit and cut nodes per step.

ONNX Runtime pays a fixed cost per node per loop step (about 0.3-0.5 us at batch 1 on the CPU, a
large share of a step at batch 64), so nodes inside the time Loop's body are what these passes cut:

- ``final_state_from_carried``: the state after the loop is the Loop's carried output, not the last
  step of a stacked copy of every state tensor;
- ``prune_unused_scan_outputs``: scan outputs nothing reads are not stacked;
- ``selects_to_where``: tf2onnx's six-node arithmetic select becomes one ``Where``;
- ``constant_loop_condition``: tf.scan's while condition (loop counter < limit and i < n, seven nodes
  recomputed each step) is already implied by the Loop's trip count: the body passes its condition on;
- ``drop_identities``: tf.scan's Identity nodes go (their consumers read the value directly).

``optimize`` runs them all and returns the counts.
"""

from __future__ import annotations

import onnx


def prune_unused_scan_outputs(model: onnx.ModelProto) -> int:
    """Drop the time Loop's scan outputs that nothing reads; returns how many.

    ``tf.scan`` stacks its whole accumulator, so the Loop stacks every layer's
    c at every step although only h, z and s_z are used. ONNX Runtime copies
    each scan output every iteration: measured on the shipped model, dropping
    them makes a call 1.02-1.2x as fast (most at short chunks), with
    bit-identical outputs.
    """
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dropped = 0
    for loop, body in _loops(graph):
        carried = len(loop.input) - 2  # inputs: trip count, condition, carried values
        pairs = list(zip(loop.output[carried:], body.output[1 + carried :]))
        keep = [(o, b) for o, b in pairs if o in used]
        dropped += len(pairs) - len(keep)
        del loop.output[carried:], body.output[1 + carried :]
        loop.output.extend(o for o, _ in keep)
        body.output.extend(b for _, b in keep)
    return dropped


def _loops(graph: onnx.GraphProto):
    """(Loop node, its body) for each Loop directly in ``graph``."""
    for node in graph.node:
        if node.op_type == "Loop":
            yield node, next(a.g for a in node.attribute if a.name == "body")


def _replace_nodes(graph: onnx.GraphProto, nodes: list) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def _select_parts(add: onnx.NodeProto, producer: dict) -> tuple[str, str, str] | None:
    """(c, x, y) if ``add`` is tf2onnx's ``Cast(c) * x + y * Cast(Not(c))``, else None."""
    def cast_input(name):
        n = producer.get(name)
        return n.input[0] if n is not None and n.op_type == "Cast" else None

    def is_not(name):
        return name is not None and name in producer and producer[name].op_type == "Not"

    if add.op_type != "Add" or len(add.input) != 2:
        return None
    m1, m2 = (producer.get(i) for i in add.input)
    if not (m1 and m2 and m1.op_type == "Mul" and m2.op_type == "Mul"):
        return None
    cond = next((c for i in m1.input if (c := cast_input(i)) is not None and not is_not(c)), None)
    neg = [i for i in m2.input if is_not(cast_input(i))]
    if cond is None or len(neg) != 1 or producer[cast_input(neg[0])].input[0] != cond:
        return None
    x = next(i for i in m1.input if cast_input(i) != cond)
    y = next(i for i in m2.input if i != neg[0])
    return cond, x, y


def _drop_dead_nodes(graph: onnx.GraphProto, nodes: list) -> list:
    """``nodes`` less those whose outputs feed nothing (in this graph, its subgraphs, its outputs)."""
    while True:
        used = {o.name for o in graph.output}
        for n in nodes:
            used.update(n.input)
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    used.update(i for sub in _graphs(attr.g) for m in sub.node for i in m.input)
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            return nodes
        nodes = keep


def selects_to_where(model: onnx.ModelProto) -> int:
    """Turn tf2onnx's arithmetic selects back into ``Where``; returns how many.

    tf2onnx writes ``tf.where(c, x, y)`` on floats as ``Cast(c) * x + y * Cast(Not(c))`` (six
    nodes; its note says ORT's Where was slow once). Both give x where c holds and y elsewhere,
    bit for bit for finite values; ONNX Runtime pays per node per loop step, so one node is
    cheaper. The nodes that only fed the pattern are removed.
    """
    count = 0
    for graph in _graphs(model.graph):
        producer = {o: n for n in graph.node for o in n.output}
        nodes, changed = [], 0
        for node in graph.node:
            parts = _select_parts(node, producer)
            if parts is not None:
                node = onnx.helper.make_node("Where", list(parts), list(node.output), name=node.name)
                changed += 1
            nodes.append(node)
        if changed:
            count += changed
            _replace_nodes(graph, _drop_dead_nodes(graph, nodes))
    return count




def constant_loop_condition(model: onnx.ModelProto) -> int:
    """Pass the body's loop condition straight on where the Loop has a trip count; returns how many.

    tf.scan becomes a while loop whose condition, ``counter < limit and i < n``, tf2onnx computes in
    the body at every step (casts, two comparisons, an And). The Loop's trip count is ``n`` already
    and the condition starts true (time is never 0), so the body's condition output can simply be
    its condition input: the Loop runs the same ``n`` iterations.
    """
    count = 0
    for graph in _graphs(model.graph):
        for loop, body in _loops(graph):
            if not loop.input[0] or body.output[0].name == body.input[1].name:
                continue
            body.output[0].name = body.input[1].name
            _replace_nodes(body, _drop_dead_nodes(body, list(body.node)))
            count += 1
    return count


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and its subgraphs (which see it as an outer-scope name) reads ``new``."""
    for sub in _graphs(graph):
        for node in sub.node:
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new


def drop_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes in loop bodies; returns how many.

    An Identity whose output is no graph output: its readers read its input instead. One whose
    output is a graph output, fed by a node of the same body whose own output is no graph output:
    that node writes the graph output's name directly. An Identity that gives one value two
    output names (a carried state that is also stacked) stays.
    """
    count = 0
    for parent in list(_graphs(model.graph)):
        for _, body in _loops(parent):
            outputs = {o.name for o in body.output}
            produced = {o: n for n in body.node for o in n.output}
            keep = []
            for node in body.node:
                if node.op_type != "Identity":
                    keep.append(node)
                    continue
                src, dst = node.input[0], node.output[0]
                if dst not in outputs:
                    _rename_uses(body, dst, src)
                elif src in produced and src not in outputs:
                    producer = produced[src]
                    producer.output[list(producer.output).index(src)] = dst
                    _rename_uses(body, src, dst)
                    produced[dst] = producer
                else:
                    keep.append(node)
                    continue
                count += 1
            _replace_nodes(body, keep)
    return count


def _int_constant(graph: onnx.GraphProto, name: str) -> list[int] | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    return None


def final_state_from_carried(model: onnx.ModelProto) -> int:
    """Read the final state from the Loop's carried outputs instead of the last stacked step; returns
    how many state tensors no longer stack.

    ``tf.scan`` stacks its accumulator, the state included, at every step, and the graph takes the
    state after the loop as ``stacked[-1]`` (a Slice of the last step, then a Squeeze). The Loop's
    carried outputs are that same value (one of the two is an Identity of the other in the body),
    so the Squeeze's output becomes the carried output's name, and the stacked copy, no longer
    read, is pruned: one copy of every state tensor per step saved.
    """
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    done, drop = 0, set()
    for loop, body in _loops(graph):
        carried = len(loop.input) - 2
        body_producer = {o: n for n in body.node for o in n.output}
        source = {}  # body value -> carried index, where the carried output is (an Identity of) it
        for k in range(carried):
            name = body.output[1 + k].name
            source[name] = k
            node = body_producer.get(name)
            if node is not None and node.op_type == "Identity":
                source[node.input[0]] = k
        for j, out in enumerate(loop.output[carried:]):
            stacked = body.output[1 + carried + j].name
            node = body_producer.get(stacked)
            k = source.get(stacked, source.get(node.input[0]) if node is not None and node.op_type == "Identity"
                           else None)
            final = loop.output[k] if k is not None else None
            if final is None or final in graph_outputs or readers.get(final):
                continue
            for sl in readers.get(out, []):
                if (sl.op_type != "Slice" or len(sl.input) < 4 or _int_constant(graph, sl.input[1]) != [-1]
                        or _int_constant(graph, sl.input[3]) != [0]):
                    continue
                squeezes = readers.get(sl.output[0], [])
                if len(squeezes) != 1 or squeezes[0].op_type != "Squeeze" or \
                        _int_constant(graph, squeezes[0].input[1]) != [0]:
                    continue
                loop.output[k] = squeezes[0].output[0]
                drop.update({id(sl), id(squeezes[0])})
                done += 1
                break
    if drop:
        _replace_nodes(graph, [n for n in graph.node if id(n) not in drop])
    return done


def optimize(model: onnx.ModelProto) -> dict[str, int]:
    """All passes, in an order where each leaves the next the most to do; returns what each did."""
    return {"final state from carried": final_state_from_carried(model),
            "unused scan outputs": prune_unused_scan_outputs(model),
            "selects to Where": selects_to_where(model),
            "loop conditions": constant_loop_condition(model),
            "identities": drop_identities(model)}


def loop_body_nodes(model: onnx.ModelProto) -> int:
    """Nodes in the time Loop's body: what ONNX Runtime runs at every step."""
    return sum(len(body.node) for _, body in _loops(model.graph))
