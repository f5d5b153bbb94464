"""TFDS builders; importing this package registers them.

`synthetic_ecg` (embedded generator) and `ptbxl` (manual_dir: the dataset in
its official layout).
"""

from evl_ecg_jax.data.builders import ptbxl  # noqa: F401
from evl_ecg_jax.data.builders import synthetic_ecg  # noqa: F401
