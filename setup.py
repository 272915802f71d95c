"""keras_pcl: Prototypical Contrastive Learning for Keras 3 / TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="keras_pcl",
    version="0.2.0",
    description="Prototypical Contrastive Learning (PCL) and its family (MoCo, SimCLR, BYOL, SimSiam, SwAV, PaCo) "
                "for Keras 3 / TensorFlow",
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
        # torchvision (which lightly needs) pairs with this torch on this project's machines; both
        # run on the CPU. PyTorch, faiss and lightly are benchmark peers only, never runtime deps.
        "bench": ["torch==2.14.1", "torchvision==0.29.1", "lightly==1.6.0", "faiss-cpu>=1.8"],
    },
    license="Apache-2.0",
)
