"""Speech engines behind one port (`port`): Amazon Transcribe and offline, one subpackage each.

Nothing is imported here, so importing the port never loads an engine's
dependencies (awscrt, onnxruntime, ...).
"""
