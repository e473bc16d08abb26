from setuptools import find_packages, setup

setup(
    name="bertforge",
    version="0.1.0",
    description="Fast BERT training: fused Triton kernels, a hand-written encoder, progressive stacking, "
    "multi-exit BERT and early-bird tickets.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bertforge", "bertforge.*"]),
    # A range, not a pin: GPU users need CUDA builds of torch. CI installs torch==2.13.0 (CPU) first.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "transformers",
        ],
        "gpu": ["flash-attn"],
        "bench": ["scikit-learn"],  # the sanity baselines of the multi-exit benchmark
        "datasets": ["datasets"],  # fine-tuning data from a `save_to_disk` folder or a Parquet file
    },
    entry_points={"console_scripts": ["bertforge=bertforge.cli:main"]},
)
