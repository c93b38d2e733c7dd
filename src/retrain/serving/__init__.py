"""The HTTP inference server behind `python serve.py`: any published model, batched, hot-swappable, measured."""
