"""Run by tests/test_data.py: a garbage ONNX Runtime session (in a reference cycle, its thread
pool idle) when a DataLoader forks its workers. Prints "done", or hangs without start_workers."""
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from conftest import PixelEncoder, make_image_folder
from simsiam_embed.inference.embed import embed_paths

folder = Path(sys.argv[1])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]), folder / "identity.onnx")
paths = sorted(make_image_folder(folder / "images", per_class=2).rglob("*.png"))
for _ in range(3):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "identity.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": [1.0]})
    time.sleep(0.5)   # the pool's threads stop spinning and wait on their condition variable
    cycle = [session]
    cycle.append(cycle)   # garbage only a collection frees
    del session, cycle
    result = embed_paths(paths, PixelEncoder(), batch_size=2, workers=2, show_progress=False)
    assert len(result.vectors) == 6
print("done")
