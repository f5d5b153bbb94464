"""evl-ecg-jax: EVL-ECG multi-aspect heterogeneous knowledge distillation in JAX."""

__version__ = "0.1.0"
