"""evl-ecg-jax: multi-aspect heterogeneous knowledge distillation for ECG models in JAX."""

import setuptools

JAX_VERSION = "0.10.2"  # [tpu] pins the libtpu wheel that matches this jax.
# Edge export (evl_ecg_jax.export, docs/deploy.md): jax2onnx converts the
# jitted inference function, onnxruntime quantises (int8, float16) and runs
# it. jax2onnx is pinned: 0.13.1 and later pin orbax-checkpoint<0.11.37,
# which conflicts with the orbax-checkpoint>=0.12 the checkpoints need.
EXPORT = ["jax2onnx==0.13.0", "onnx>=1.17", "onnxruntime>=1.20"]

setuptools.setup(
    name="evl-ecg-jax",
    version="0.1.0",
    description=("EVL-ECG distillation of large ECG models into small ones, "
                 "in JAX/Flax."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["evl_ecg_jax", "evl_ecg_jax.*"]),
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "ott-jax>=0.6.0",
        "orbax-checkpoint>=0.12.0",
        # TFDS without TensorFlow: builders write array_record, read through
        # tfds.data_source. importlib_resources is an undeclared tfds import.
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8.1",
        "importlib_resources>=6.0",
        "grain>=0.2.12",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "tensorboardX>=2.6.2",
        "wfdb>=4.1.2",
        "h5py>=3.10",  # CODE-15% tracings (exams_part*.hdf5).
        "numpy>=1.26",
        "scipy>=1.11",  # band-pass filters, resampling, paired t-intervals.
        "tqdm>=4.66",
        "matplotlib>=3.8",  # figures of docs/results.md (kd_report).
        "tokenizers>=0.20",  # VLM tokenizers, trained at build time.
        # jax's persistent compilation cache locks its files with it when a
        # size limit is set (the demo's and the tests' concurrent processes).
        "filelock>=3.12",
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # make test: two workers (Makefile).
            "POT>=0.9.4",
            "scikit-learn>=1.4",
            *EXPORT,
        ],
        "export": EXPORT,
        # benchmarks/torch_reference.py: an independent PyTorch version of
        # the losses to time ours against; benchmarks/torch_teacher.py: a
        # PyTorch teacher exported with torch.onnx (docs/teachers.md). Capped
        # at 2.13.0, whose CPU build (2.13.0+cpu) pip prefers where a wheel
        # directory offers it; later releases resolve to CUDA builds of
        # several GB.
        "torch-reference": ["torch>=2.2,<=2.13.0"],
        # jax[tpu] pulls the libtpu wheel built for this exact jax release
        # (also what evl_ecg_jax.aot compiles with on a CPU host); gs://
        # workdirs need the GCS clients (orbax via gcsfs, TensorBoard).
        "tpu": [f"jax[tpu]=={JAX_VERSION}", "gcsfs>=2024.2.0",
                "google-cloud-storage>=2.14"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    license="Apache-2.0",
)
