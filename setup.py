"""Packaging for megatron-ulysses."""

from setuptools import find_packages, setup

setup(
    name="megatron-ulysses",
    version="0.1.0",
    description="Megatron-style GPT pretraining with DeepSpeed-Ulysses sequence parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron", "megatron.*"]),
    package_data={"megatron.validate": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            # Same Triton minor as the GPU image, so CPU (interpreter) and GPU test one Triton.
            "triton==3.6.*; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "transformers==5.17.0",
            "safetensors",
        ],
        "flash": ["flash-attn"],
    },
)
