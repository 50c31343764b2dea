"""The encoder outside training: the ONNX format, export, embedding, kNN and linear-probe evaluation."""
