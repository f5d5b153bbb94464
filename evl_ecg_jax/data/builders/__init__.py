"""TFDS builders; importing this package registers them (`synthetic_ecg`)."""

from evl_ecg_jax.data.builders import synthetic_ecg  # noqa: F401
