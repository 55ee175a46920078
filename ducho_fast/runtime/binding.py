"""Device I/O for CUDA sessions: ONNX Runtime I/O binding with input buffers kept per shape.

``session.run`` with numpy feeds allocates device memory for every input of every batch and
copies outputs back through a temporary. An :class:`IOBinder` allocates each input's device
buffer once per (name, shape, dtype) and copies the batch into it, binds outputs to the
device, and copies them back after the run. Batches of a run mostly share a few shapes
(images: one; texts: one per bucket length), so allocation stops after the first batches.

The device-specific calls are the three ORT ones (``ortvalue_from_shape_and_type``,
``update_inplace``, ``bind_output``); the device is a parameter, so the same logic runs on the
CPU in the test suite and on CUDA where there is one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort


class IOBinder:
    """Runs one session with bound inputs and outputs on ``device`` (``cuda`` or ``cpu``)."""

    def __init__(
        self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0
    ) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.buffers: dict[tuple[str, tuple[int, ...], str], Any] = {}
        self.allocations = 0

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like ``session.run(names, feeds)``, through device buffers."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            buffer = self._buffer(name, np.ascontiguousarray(array))
            binding.bind_ortvalue_input(name, buffer)
        for name in names:
            binding.bind_output(name, self.device, self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [np.asarray(v) for v in binding.copy_outputs_to_cpu()]

    def _buffer(self, name: str, array: np.ndarray) -> Any:
        key = (name, tuple(array.shape), array.dtype.str)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                array.shape, array.dtype, self.device, self.device_id
            )
            self.buffers[key] = buffer
            self.allocations += 1
        buffer.update_inplace(array)  # host -> device copy into the kept buffer
        return buffer
