"""Teachers brought from other frameworks: an ONNX graph and a declarative
spec of what it reads and returns (docs/teachers.md)."""
