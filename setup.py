"""keras_pcl: Prototypical Contrastive Learning for Keras 3 / TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="keras_pcl",
    version="0.1.0",
    description="Prototypical Contrastive Learning (PCL) and MoCo for Keras 3 / TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_pcl", "keras_pcl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.9",
        "scikit-learn>=1.3",
        "absl-py>=1.0",
        "tensorboard>=2.16",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "tfds": ["tensorflow-datasets"],
        "bench": ["torch==2.13.0", "faiss-cpu>=1.8"],
    },
    license="Apache-2.0",
)
