"""tinygptv-edge: TinyGPT-V exported for CPUs and edge boards.

Subpackages: ``export`` (torch reference model, loaders, ONNX and GGUF exporters; needs the
``export`` extra), ``runtime`` (onnxruntime + ggml inference, no torch), ``calib`` (calibration
sets and accuracy reports).
"""

__version__ = "0.1.0"
