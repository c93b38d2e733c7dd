"""Inference on deployable files: load any exported or saved model, read images, write predictions."""
