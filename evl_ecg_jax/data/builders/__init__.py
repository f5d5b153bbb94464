"""TFDS builders; importing this package registers them.

`synthetic_ecg` (embedded generator); `ptbxl`, `cinc2021` and `code15`
(manual_dir: the datasets in their official layouts).
"""

from evl_ecg_jax.data.builders import cinc2021  # noqa: F401
from evl_ecg_jax.data.builders import code15  # noqa: F401
from evl_ecg_jax.data.builders import ptbxl  # noqa: F401
from evl_ecg_jax.data.builders import synthetic_ecg  # noqa: F401
