"""hmlstm: streaming sequence segmentation with a Hierarchical Multiscale LSTM.

The package follows the pipeline: ``hmlstm.model`` (TensorFlow, training) ->
``hmlstm.export`` (ONNX with the time loop kept) -> ``hmlstm.serving`` (gRPC on
ONNX Runtime, no TensorFlow).
"""

__version__ = "0.1.0"
