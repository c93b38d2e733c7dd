"""Export to deployable formats: TorchScript, torch.export, ONNX, int8; and the benchmark of what was written."""
