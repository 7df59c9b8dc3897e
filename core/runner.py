"""One ONNX shard in an onnxruntime session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class ShardRunner:
    """Runs one shard; ``threads`` bounds onnxruntime's intra-op pool (1 on a Pi-class device)."""

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))
