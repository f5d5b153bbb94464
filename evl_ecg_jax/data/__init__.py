"""Data: synthetic ECG generator, TFDS builders and input pipelines."""
