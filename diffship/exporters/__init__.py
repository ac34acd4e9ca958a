"""torch -> ONNX: one component at a time (`onnx`), and a whole pipeline folder (`pipeline`)."""
