from setuptools import find_packages, setup

setup(
    name="dfm",
    version="0.1.0",
    description="Decomposable Flow Matching: staged Laplacian-pyramid flow matching on SiT transformers",
    python_requires=">=3.10",
    # kernels/ and launch/ live at the top of the repository but install inside the dfm namespace:
    # a top-level "kernels" would clash with the PyPI package of that name.
    packages=find_packages(include=["dfm", "dfm.*"]) + ["dfm.kernels", "dfm.launch", "dfm.launch.experiments"],
    package_dir={"dfm": "dfm", "dfm.kernels": "kernels", "dfm.launch": "launch"},
    # The floor is what current CUDA images ship (torch 2.11, Triton 3.6); CI pins torch 2.13.0 with the
    # Triton its CUDA build uses (3.7.1). Nothing here uses an API newer than that floor.
    install_requires=[
        "torch>=2.11",
        "numpy",
        "triton>=3.6",
        "deepspeed>=0.16",
        "nvidia-dali-cuda130",  # imports without a GPU; CPU pipelines run anywhere
        "pyyaml",
        "safetensors",
        "tqdm",
        "Pillow",
        "scipy",
        "scikit-learn",
        "diffusers",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "ruff", "matplotlib"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["dfm=dfm.launch.cli:main"]},
)
