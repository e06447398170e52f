"""Count the device-to-host synchronisations a piece of code makes, on any device, CPU included.

A training or sampling step must queue work and never wait for the accelerator except at log intervals.
On CUDA ``torch.cuda.set_sync_debug_mode`` catches some waits, but only on a GPU and only those the CUDA
runtime flags. :class:`HostSyncCounter` sees them one level higher, where they are made, so the same test
proves the property on a CPU-only machine:

- every ATen operator that must read a value back to the host: ``_local_scalar_dense`` (``.item()``,
  ``float(t)``, ``bool(t)``, ``if t:``), ``is_nonzero``, ``nonzero`` (``torch.where`` with one argument),
  ``equal``, the data-dependent-shape ops listed in ``HOST_READ_OPS``, and indexing with a boolean mask;
- every copy from a non-CPU device to the host (``.cpu()``, ``.to("cpu")``, ``.tolist()`` and ``.numpy()`` of
  a device tensor go through such a copy), and on CPU tensors the ``.tolist()`` / ``.numpy()`` calls that would
  be such copies on an accelerator;
- every blocking copy from the host to a device (``non_blocking=False``: torch waits for the stream after it),
  and every tensor built from host data (``torch.tensor(python_values, device=...)``, seen as ``lift_fresh``),
  which on an accelerator is such a copy;
- every call of an explicit barrier: ``torch.cuda.synchronize``, ``torch.accelerator.synchronize``, CUDA
  stream/event ``synchronize`` and DeepSpeed's ``get_accelerator().synchronize()``.

The operators are counted by a ``TorchDispatchMode``, so they are seen whoever calls them (our code,
DeepSpeed, torch's optimizers) and below autograd; each record keeps the first stack frame outside torch,
which names the line to fix.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose result cannot be known without reading device memory on the host.
HOST_READ_OPS = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.nonzero,
    aten.equal,
    aten.masked_select,
    aten.unique_consecutive,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.repeat_interleave,
    aten.bincount,
    aten.histc,
}
# Indexing with a boolean mask (x[mask], x[mask] = v) must count the mask's True entries on the host first.
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
COPY_OPS = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize}
FROM_HOST_DATA = aten.lift_fresh


@dataclass
class SyncRecord:
    what: str  # operator or barrier name
    where: str  # "file:line in function" of the first frame outside torch
    callers: tuple[str, ...] = ()  # names of the functions on the stack, outermost first


@dataclass(repr=False)  # the readable listing below is what a failing assertion should show
class SyncReport:
    records: list[SyncRecord] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.records)

    def by_site(self) -> collections.Counter:
        return collections.Counter((r.what, r.where) for r in self.records)

    def __str__(self) -> str:
        if not self.records:
            return "no host syncs"
        lines = [f"{n} x {what} at {where}" for (what, where), n in self.by_site().most_common()]
        return f"{self.count} host syncs:\n  " + "\n  ".join(lines)

    __repr__ = __str__


def _call_site() -> tuple[str, tuple[str, ...]]:
    """The innermost stack frame that is not torch's or this module's, and every function on the stack."""
    stack = traceback.extract_stack()[:-2]
    where = "<unknown>"
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("/host_sync.py") or "/contextlib.py" in path:
            continue
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        break
    return where, tuple(frame.name for frame in stack)


def _device_of(value) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


def _device_value(args) -> bool:
    """masked_fill's value given as a tensor on an accelerator: read back to the host to fill with."""
    value = args[2] if len(args) > 2 else None
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _copy_kind(func, args, kwargs) -> str | None:
    """``"device to host"`` or ``"blocking host to device"`` for a copy that waits for the device, else None."""
    packet = func.overloadpacket
    if packet is aten._to_copy:
        src, dst = _device_of(args[0]), kwargs.get("device")
        dst = None if dst is None else torch.device(dst)
        non_blocking = kwargs.get("non_blocking", False)
    else:
        dst_t, src_t = (args[0], args[1]) if packet is aten.copy_ else (args[1], args[0])
        src, dst = _device_of(src_t), _device_of(dst_t)
        non_blocking = args[2] if packet is aten.copy_ and len(args) > 2 else kwargs.get("non_blocking", False)
    if src is None or dst is None or (src.type == "cpu") == (dst.type == "cpu"):
        return None
    if dst.type == "cpu":
        return "device to host"
    return None if non_blocking else "blocking host to device"


class HostSyncCounter(TorchDispatchMode):
    """Context manager recording every host synchronisation made inside it (see the module docstring).

    ``with HostSyncCounter() as syncs: step()`` then ``syncs.report.count`` (and ``str(syncs.report)`` for
    where they were made). Nested use is fine; the counter adds a Python call per operator, so it is a test
    and diagnosis tool, not something to leave on in production.
    """

    def __init__(self):
        super().__init__()
        self.report = SyncReport()
        self._patches = contextlib.ExitStack()
        self._in_barrier = False  # DeepSpeed's CUDA synchronize calls torch.cuda.synchronize: one barrier, one record

    def _record(self, what: str) -> None:
        self.report.records.append(SyncRecord(what, *_call_site()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in HOST_READ_OPS:
            self._record(str(packet))
        elif packet in MASK_INDEX_OPS and _has_mask_index(args):
            self._record(f"{packet} with a boolean mask")
        elif packet in (aten.masked_fill, aten.masked_fill_) and _device_value(args):
            self._record(f"{packet} with a device tensor as the value")
        elif packet is FROM_HOST_DATA:
            self._record("torch.tensor from host data")
        elif packet in COPY_OPS:
            kind = _copy_kind(func, args, kwargs)
            if kind is not None:
                self._record(f"{packet} ({kind})")
        return func(*args, **kwargs)

    # -- explicit barriers ----------------------------------------------------------------------------------
    def _patch(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            if self._in_barrier:
                return original(*args, **kwargs)
            self._record(label)
            self._in_barrier = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_barrier = False

        setattr(owner, name, counted)
        self._patches.callback(setattr, owner, name, original)

    def _patch_host_reads(self) -> None:
        # .tolist() / .numpy() of a CPU tensor reach no operator; of a device tensor they copy (counted above).
        for name in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                if tensor.device.type == "cpu":
                    self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
            self._patches.callback(setattr, torch.Tensor, name, original)

    def _patch_barriers(self) -> None:
        self._patch(torch.cuda, "synchronize", "torch.cuda.synchronize")
        self._patch(torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize")
        self._patch(torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")
        if hasattr(torch, "accelerator"):
            self._patch(torch.accelerator, "synchronize", "torch.accelerator.synchronize")
        try:
            from deepspeed.accelerator import get_accelerator
        except ImportError:  # DeepSpeed is only needed by the training engine
            return
        accelerator = get_accelerator()
        self._patch(type(accelerator), "synchronize", f"{type(accelerator).__name__}.synchronize")

    def __enter__(self):
        self._patch_host_reads()
        self._patch_barriers()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


__all__ = ["HOST_READ_OPS", "HostSyncCounter", "SyncRecord", "SyncReport"]
