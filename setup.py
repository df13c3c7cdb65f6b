"""Builds the optional C extension ``rnca_cli._fused`` (the ``fused`` engine's CPU kernels).

Everything else is declared in pyproject.toml. The extension is optional: where no C compiler
works, the install still succeeds and rnca runs in PyTorch alone (same results, slower);
``rnca --version`` says which engine runs. The numbers the kernels share with Python come from
``rnca_cli/constants.py`` as ``-DRNCA_...`` macros. Flags are tried in order: with OpenMP (the
kernels run on all of torch's threads), then without.
"""

import runpy
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CONSTANTS = runpy.run_path(str(Path(__file__).parent / "rnca_cli" / "constants.py"))
MACROS = [(name, str(value)) for name, value in CONSTANTS["C_MACROS"].items()]
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
        print("rnca: the fused CPU kernels were not built; rnca will run in PyTorch alone (slower).")
        for line in errors:
            print(f"rnca:   {line}")


setup(
    ext_modules=[Extension("rnca_cli._fused", ["rnca_cli/_fused.c"], define_macros=MACROS, optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
