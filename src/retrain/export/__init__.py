"""Export to deployable formats: TorchScript, torch.export, ONNX, int8, pruning."""
