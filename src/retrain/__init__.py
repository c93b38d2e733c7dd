"""retrain: save, reload and retrain ResNet image classifiers with Lightning and Hydra."""

__version__ = "0.1.0"
