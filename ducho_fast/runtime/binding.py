"""Device I/O for CUDA sessions: ONNX Runtime I/O binding in three steps on three threads.

``session.run`` with numpy feeds allocates device memory for every input of every batch,
copies it in, runs, and copies the outputs back before it returns: the GPU idles during both
copies. An :class:`IOBinder` splits that so the pipeline can overlap it:

- :meth:`IOBinder.stage` (a reader thread): copies a batch's inputs into device buffers taken
  from a pool kept per (name, shape, dtype), through page-locked ("pinned") host buffers when
  the CUDA runtime can pin memory, while the model runs the previous batch;
- :meth:`IOBinder.run` (the model thread): binds the staged inputs and device outputs, runs,
  and gives the input buffers back to the pool; the outputs stay on the device;
- :meth:`IOBinder.fetch` (the writer thread): copies the outputs back while the model runs
  the next batch.

Batches of a run mostly share a few shapes (images: one; texts: one per bucket length), so
after the first batches nothing is allocated: a pool holds as many buffers per shape as
batches are in flight at once (the prefetch queue's, plus one staging, plus one running).

The device-specific calls are ORT's (``ortvalue_from_shape_and_type``, ``update_inplace``,
``bind_output``, ``OrtValue.numpy``) and ``cudaHostRegister``; the device is a parameter, so
the same logic runs on the CPU in the test suite and on CUDA where there is one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger("ducho_fast")

Key = tuple[str, tuple[int, ...], str]
PinFn = Callable[[np.ndarray], bool]  # page-locks an array's memory in place; False: could not
CUDA_RUNTIMES = ("cudart", "libcudart.so.13", "libcudart.so.12", "libcudart.so")


@dataclass
class Slot:
    """One input's device buffer, and the pinned host buffer it is copied from (if any)."""

    device: Any  # OrtValue on the binder's device
    host: np.ndarray | None = None


@dataclass
class Staged:
    """A batch's inputs on the device, bound by :meth:`IOBinder.run`, which frees them."""

    slots: dict[str, tuple[Key, Slot]] = field(default_factory=dict)


class IOBinder:
    """Runs one session with bound inputs and outputs on ``device`` (``cuda`` or ``cpu``)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        device: str = "cuda",
        device_id: int = 0,
        pin: PinFn | None = None,
    ) -> None:
        """``pin``: how host staging buffers are page-locked; none: copy from the batch."""
        self.session = session
        self.device = device
        self.device_id = device_id
        self.pin = pin
        self.allocations = 0
        self._free: dict[Key, list[Slot]] = {}
        self._lock = threading.Lock()

    def stage(self, feeds: dict[str, np.ndarray]) -> Staged:
        """Copy a batch's inputs to the device (any thread); :meth:`run` binds them."""
        staged = Staged()
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            key = (name, tuple(array.shape), array.dtype.str)
            slot = self._take(key, array)
            if slot.host is not None:
                np.copyto(slot.host, array)  # into page-locked memory: the copy is a DMA
                array = slot.host
            slot.device.update_inplace(array)  # host -> device copy into the kept buffer
            staged.slots[name] = (key, slot)
        return staged

    def run(self, names: list[str], staged: Staged) -> list[Any]:
        """Run on staged inputs (the model's thread); outputs stay on the device."""
        binding = self.session.io_binding()
        try:
            for name, (_, slot) in staged.slots.items():
                binding.bind_ortvalue_input(name, slot.device)
            for name in names:
                binding.bind_output(name, self.device, self.device_id)
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return list(binding.get_outputs())
        finally:
            self._give_back(staged)

    def fetch(self, values: list[Any]) -> list[np.ndarray]:
        """Outputs of :meth:`run` copied to host memory (the writer's thread)."""
        return [np.asarray(v.numpy()) for v in values]

    def run_feeds(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like ``session.run(names, feeds)``, through device buffers, in one call."""
        return self.fetch(self.run(names, self.stage(feeds)))

    def _take(self, key: Key, array: np.ndarray) -> Slot:
        with self._lock:
            free = self._free.setdefault(key, [])
            if free:
                return free.pop()
            self.allocations += 1
        device = ort.OrtValue.ortvalue_from_shape_and_type(
            array.shape, array.dtype, self.device, self.device_id
        )
        host = None
        if self.pin is not None:
            host = np.empty_like(array)
            if not self.pin(host):
                host = None
        return Slot(device, host)

    def _give_back(self, staged: Staged) -> None:
        with self._lock:
            for key, slot in staged.slots.values():
                self._free[key].append(slot)
        staged.slots.clear()


def cuda_pinning(maps: Path = Path("/proc/self/maps")) -> PinFn | None:
    """``cudaHostRegister`` from the CUDA runtime that onnxruntime-gpu loads; None without it.

    The copy of the runtime already in the process (``maps``: where its CUDA provider loaded
    it from, e.g. a pip package of NVIDIA's) comes first, then the names the system's loader
    knows: one found elsewhere first could be another CUDA version than the provider's.
    Memory stays page-locked for the life of its array (the pool keeps its buffers as long
    as the session) and is unregistered before it is freed.
    """
    for path in cuda_runtime_candidates(maps):
        try:
            cudart = ctypes.CDLL(path)
            register = cudart.cudaHostRegister
            unregister = cudart.cudaHostUnregister
        except (OSError, AttributeError):
            continue
        register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        register.restype = ctypes.c_int
        unregister.argtypes = [ctypes.c_void_p]
        unregister.restype = ctypes.c_int
        return _pinner(register, unregister)
    log.info("the CUDA runtime library was not found: input batches are copied unpinned")
    return None


def cuda_runtime_candidates(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """Where to load the CUDA runtime from, in order: the copies mapped into this process
    (``maps``, Linux's list of them), then ``CUDA_RUNTIMES`` (a bare name through
    ``ctypes.util.find_library``, a file name through the loader's search)."""
    loaded: list[str] = []
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        if len(fields) == 6 and Path(fields[5]).name.startswith("libcudart.so"):
            loaded.append(fields[5])
    named = [ctypes.util.find_library(n) if "." not in n else n for n in CUDA_RUNTIMES]
    return list(dict.fromkeys([*loaded, *(n for n in named if n)]))


def _pinner(register: Any, unregister: Any) -> PinFn:
    def pin(array: np.ndarray) -> bool:
        if array.nbytes == 0 or int(register(array.ctypes.data, array.nbytes, 0)) != 0:
            return False  # not cudaSuccess: the slot copies unpinned
        weakref.finalize(array, unregister, array.ctypes.data)  # before the memory is freed
        return True

    return pin
