"""Builds the optional C extension ``rnca_cli._fused`` (fused CPU inference kernels).

Everything else is declared in pyproject.toml. The extension is optional: where no C compiler
works, the install still succeeds and rnca runs its inference in PyTorch alone (same results,
slower); ``rnca --version`` says which. Flags are tried in order: with OpenMP (the kernels run on
all of torch's threads), then without.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = {
    "msvc": [(["/O2", "/openmp"], []), (["/O2"], [])],
    "unix": [(["-O3", "-fopenmp"], ["-fopenmp"]), (["-O3"], [])],
}


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        errors = []
        for compile_args, link_args in FLAGS.get(self.compiler.compiler_type, FLAGS["unix"]):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                return super().build_extension(ext)
            except Exception as error:  # compiler missing or a flag it does not take
                errors.append(f"{' '.join(compile_args)}: {error}")
        print("rnca: the fused CPU kernels were not built; inference will run in PyTorch alone (slower).")
        for line in errors:
            print(f"rnca:   {line}")


setup(
    ext_modules=[Extension("rnca_cli._fused", ["rnca_cli/_fused.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
