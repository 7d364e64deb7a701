"""TensorFlow 2 side of the project: train ArcFace models, export their embedding branch to ONNX with
the ``face.*`` contract the service reads, evaluate models on LFW-style pairs. Installed with the
``export`` extra; the service never imports it. Entry point: ``python -m exporter --help``.
"""
