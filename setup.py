"""fastrlhf: fused Triton / C++ kernels for RLHF losses.

The native CPU backend (``fastrlhf._C``, from ``fastrlhf/csrc``) is an optional pybind11
extension. It takes raw buffer addresses from Python, so it builds without torch (pip's
isolated build environment has none) and is not tied to one torch ABI. If it fails to build,
the install still succeeds and CPU tensors use the chunked torch path
(``fastrlhf.available_backends()`` tells which backends are there).
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the native extension if possible; never fail the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # compiler missing, etc.
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._warn(e)

    @staticmethod
    def _warn(e):
        sys.stderr.write(f"\nWARNING: fastrlhf native CPU backend not built ({e}); the torch path will be used.\n\n")


def native_extensions():
    """``fastrlhf._C`` from ``fastrlhf/csrc/*.cpp`` (no torch headers: raw buffers from Python).

    The row kernels are compiled for AVX-512, AVX2+FMA+F16C and a portable fallback with
    function-level ``target`` attributes and picked at load time from cpuid (``csrc/simd.h``),
    so the build uses no ``-march`` flag and the wheel runs on any CPU of its architecture.
    ``-ffp-contract=off``: the kernels' FMAs are explicit, and the compiler must not fuse
    others differently per ISA (the AVX2 and AVX-512 kernels give the same bits).

    Environment: ``FASTRLHF_NO_NATIVE=1`` skips it; ``FASTRLHF_OPENMP=0`` builds without
    OpenMP threads (e.g. Apple clang without libomp). ``FASTRLHF_NATIVE_ARCH`` is no longer
    read (there is no ``-march=native`` to drop). At run time ``FASTRLHF_NATIVE_SIMD=avx2``
    (or ``portable``) caps the kernels used.
    """
    sources = sorted(glob.glob(os.path.join("fastrlhf", "csrc", "*.cpp")))
    if not sources or os.environ.get("FASTRLHF_NO_NATIVE") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        sys.stderr.write(
            "\nWARNING: pybind11 is not installed: fastrlhf native CPU backend not built; the torch path will be "
            "used (pip install pybind11, then rebuild).\n\n"
        )
        return []
    use_openmp = os.environ.get("FASTRLHF_OPENMP", "1") == "1"
    compile_args = ["-O3", "-ffp-contract=off", "-fopenmp" if use_openmp else "-fopenmp-simd"]
    return [
        Pybind11Extension(
            "fastrlhf._C",
            sources,
            depends=sorted(glob.glob(os.path.join("fastrlhf", "csrc", "*.h"))
                           + glob.glob(os.path.join("fastrlhf", "csrc", "*.inl"))),
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"] if use_openmp else [],
        )
    ]


setup(
    name="fastrlhf",
    version="0.1.0",
    description="Fused Triton and C++ kernels for RLHF losses (PPO, GRPO, DPO) without vocabulary-sized temporaries",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastrlhf", "fastrlhf.*"]),
    package_data={"fastrlhf": ["csrc/*.cpp", "csrc/*.h", "csrc/*.inl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # triton 3.6's interpreter (the CPU test path) calls int() on size-1 arrays,
        # which numpy 2.4 turned into a TypeError.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy<2.4"],
        "algos": ["transformers>=4.45", "tqdm", "matplotlib", "peft", "pyyaml"],
        # TRL is pure Python; its tests compare our drop-ins with its own functions and trainers.
        "integrations": ["trl>=1.16,<2"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm", "liger-kernel==0.8.5"],  # liger: sm90_static.py compares
    },
    entry_points={"console_scripts": ["fastrlhf=fastrlhf.cli:main"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
