"""The offline speech engine: endpointing (`endpointer`), Moonshine on onnxruntime (`moonshine`,
`onnx_graph`), the engine over them (`engine`), and decoding on a thread pool (`pool`).

Nothing is imported here, so `pool` loads without the engine's dependencies.
"""
