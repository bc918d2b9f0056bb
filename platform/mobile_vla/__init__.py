"""Mobile VLA: train and serve a Kosmos-2 + CLIP + LSTM policy for omniwheel robots on Ray."""

__version__ = "0.1.0"
