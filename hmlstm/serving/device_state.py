"""Recurrent state that stays where the model ran (ONNX Runtime IO binding).

Without binding, every call copies each stream's state to the host when it
ends and back to the device when the stream's next piece runs. With binding,
a call's state outputs stay on the device as ``OrtValue``s (``BoundBatch``),
and each stream holds references to its rows (``RowRef``). When the next
call's streams are exactly the rows of one earlier call (the steady state of
a busy server: the same streams, batch after batch), those ``OrtValue``s are
bound straight back as inputs, so only tokens and results cross the bus.
Otherwise the rows are copied to the host once per earlier call and gathered
as before.

Anything that needs a state on the host (a state store record, the unbatched
path) calls ``np.asarray`` on it: a ``RowRef`` copies its call's state to the
host once, and then serves every row of it from that copy.

On the CPU provider the "device" is host memory: binding changes nothing
measurable there, so it is on only with CUDA by default. The tests switch it
on for the CPU to check the bookkeeping.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from hmlstm import spec


class BoundBatch:
    """The state outputs of one bound call, on the device that ran it."""

    def __init__(self, values: dict[str, ort.OrtValue], rows: int):
        self.values = values  # output name -> OrtValue [rows, ...]
        self.rows = rows
        self._host: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def host(self, output: str) -> np.ndarray:
        with self._lock:
            if self._host is None:
                self._host = {k: v.numpy() for k, v in self.values.items()}
        return self._host[output]


class RowRef:
    """Row ``row`` of state output ``output`` of a bound call; ``np.asarray`` brings it to the host."""

    __slots__ = ("batch", "output", "row")
    dtype = np.dtype(np.float32)

    def __init__(self, batch: BoundBatch, output: str, row: int):
        self.batch, self.output, self.row = batch, output, row

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.batch.values[self.output].shape()[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.batch.host(self.output)[self.row : self.row + 1]
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, index):
        return np.asarray(self)[index]


def host_state(state: dict) -> dict[str, np.ndarray]:
    """The same state with every value as a NumPy array on the host."""
    return {k: np.asarray(v) for k, v in state.items()}


def reusable(states: list[dict]) -> tuple[BoundBatch, list[int]] | None:
    """If these streams' states are all the rows of one bound call: that call, and each stream's row."""
    first = next(iter(states[0].values()))
    if not isinstance(first, RowRef) or first.batch.rows != len(states):
        return None
    batch, rows = first.batch, []
    for st in states:
        refs = list(st.values())
        if not all(isinstance(r, RowRef) and r.batch is batch and r.row == refs[0].row for r in refs):
            return None
        rows.append(refs[0].row)
    return (batch, rows) if sorted(rows) == list(range(len(states))) else None


class Binder:
    """Runs a model with IO binding: state outputs stay on the session's device."""

    def __init__(self, model):
        self.session = model.runtime.session
        self.cpu = model.runtime.cpu
        self.device = "cuda" if model.runtime.on_cuda else "cpu"
        self.state_map = dict(model.state_map)  # output -> input
        self.output_for = {i: o for o, i in self.state_map.items()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.reused = 0  # calls whose whole state came from the previous bound call, on the device
        self.gathered = 0  # calls whose state was gathered on the host

    def run(self, tokens: np.ndarray, lengths: np.ndarray,
            state: dict[str, np.ndarray] | BoundBatch) -> tuple[dict[str, np.ndarray], BoundBatch]:
        """One call. ``state``: host arrays [B, ...] per input, or a BoundBatch whose rows are in order.

        Returns the non-state outputs on the host and the state outputs, still on the device.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input(spec.TOKENS, np.ascontiguousarray(tokens))
        binding.bind_cpu_input(spec.LENGTHS, np.ascontiguousarray(lengths))
        if isinstance(state, BoundBatch):
            for name, output in self.output_for.items():
                binding.bind_ortvalue_input(name, state.values[output])
            self.reused += 1
        else:
            for name, arr in state.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            self.gathered += 1
        for name in self.outputs:
            binding.bind_output(name, self.device if name in self.state_map else "cpu")
        self.cpu.run(self.session.run_with_iobinding, binding)
        values = dict(zip(self.outputs, binding.get_outputs()))
        host = {k: v.numpy() for k, v in values.items() if k not in self.state_map}
        return host, BoundBatch({k: values[k] for k in self.state_map}, len(tokens))

    def states(self, bound: BoundBatch) -> list[dict]:
        """Per row of a bound call: its next state, RowRefs by input name."""
        return [{i: RowRef(bound, o, r) for o, i in self.state_map.items()} for r in range(bound.rows)]
