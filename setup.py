"""Builds nemoh's native CPU kernels (nemoh/kernels/cpu/) with the system C++ compiler at `pip install`.

The kernels are optional: when the build fails (no compiler) the install still succeeds and nemoh runs its
PyTorch reference paths, saying so once in the log. Everything else is configured in pyproject.toml.
"""
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["module.c", "runtime.cpp", "linear.cpp", "ops.cpp", "mamba.cpp", "attention.cpp", "moe.cpp"]
CXX_FLAGS = ["-O3", "-g0", "-std=c++20", "-fno-math-errno"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # AVX2 + FMA + F16C (2013 and later x86 CPUs); nemoh checks the CPU before loading the library
    CXX_FLAGS += ["-mavx2", "-mfma", "-mf16c"]


class BuildKernels(build_ext):
    """C sources get C flags, C++ sources C++20 flags; a failed build is reported and skipped."""

    def build_extension(self, ext):
        original = self.compiler._compile

        def compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
            flags = ["-O2"] if src.endswith(".c") else CXX_FLAGS
            original(obj, src, ext_name, cc_args, flags, pp_opts)

        self.compiler._compile = compile_one
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves nemoh on its reference paths
            print(f"nemoh: the native CPU kernels were not built ({e}); nemoh will use its PyTorch paths")
        finally:
            self.compiler._compile = original


setup(
    ext_modules=[Extension("nemoh.kernels._cpu", [f"nemoh/kernels/cpu/{s}" for s in SOURCES],
                           depends=[str(p) for p in Path("nemoh/kernels/cpu").glob("*.h")],
                           extra_link_args=["-lstdc++", "-pthread"], language="c++")],
    cmdclass={"build_ext": BuildKernels},
)
