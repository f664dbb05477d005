"""paddlemix-ixc2: InternLM-XComposer2 in PaddlePaddle (PaddleMIX-style package)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="paddlemix-ixc2",
    version="0.1.0",
    description="InternLM-XComposer2 (vision-language, Partial-LoRA) for PaddlePaddle: chat, fine-tuning, conversion",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["paddlemix", "paddlemix.*"]),
    package_data={
        "paddlemix": ["config/internlm_xcomposer2/*.json"],
        "paddlemix.models.internlm_xcomposer2": ["assets/*"],
    },
    include_package_data=True,
    # Exact pins live in constraints.txt; these ranges say what the code needs.
    install_requires=[
        "paddlenlp==3.0.0b4",
        "aistudio-sdk==0.2.6",
        "pyarrow<22",
        "numpy<2",
        "huggingface_hub>=0.30,<1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "pillow>=10",
        "requests>=2.28",
        "ml_dtypes>=0.3",
    ],
    # Paddle itself is an extra: GPU users install paddlepaddle-gpu from Paddle's own index,
    # and a hard requirement on "paddlepaddle" would pull the CPU build over it.
    extras_require={"cpu": ["paddlepaddle>=3.1"], "test": ["pytest>=8"]},
    entry_points={
        "console_scripts": [
            "paddlemix-ixc2-quickstart = paddlemix.examples.internlm_xcomposer2.quickstart:main",
        ],
    },
)
