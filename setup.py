"""Build hook: compile the data plane's hottest modules with mypyc, when possible.

The modules on the request path (listed in doproxy/_compiled.py) are plain, fully typed
Python; mypyc turns them into one C extension that runs the same code with about half the
instructions per request (calls between them become native C calls).
The build falls back to pure Python, with a warning, when mypyc, a C compiler or the Python
headers are missing, or when DOPROXY_PURE_PYTHON is set. Everything else is in pyproject.toml.

Whether to compile is decided once, up front, by compiling and linking a tiny extension with
the compiler build_ext would use (CC, LDSHARED and CFLAGS are honoured). Deciding first keeps the
wheel honest: a build that cannot compile makes a pure wheel (py3-none-any) instead of one tagged
for this platform with no compiled code in it (an optional extension that fails to build is
skipped, but the wheel's tag was chosen before). The C code itself is generated only when
build_ext is set up (by a build, and by the sdist, which asks it for its sources), not each time
setup.py runs for metadata: each mypyc pass type-checks the data plane.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import tempfile
from importlib.util import find_spec
from pathlib import Path

from setuptools import Distribution, Extension, setup
from setuptools.command.build_ext import build_ext


def compiled_modules() -> list[str]:
    """The source files of doproxy/_compiled.py's COMPILED, the one list of compiled modules
    (the pure-Python switch and the Makefile read it too). Read with `ast`: the build must not
    import the package it is building."""
    path = Path(__file__).resolve().parent / "doproxy" / "_compiled.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            return [name.replace(".", "/") + ".py" for name in ast.literal_eval(node.value)]
    raise RuntimeError(f"no COMPILED in {path}")


def _say(message: str) -> None:
    print(f"doproxy: {message}", file=sys.stderr)


def can_build_extensions() -> bool:
    """Does a C extension compile and link here: a compiler, a linker and Python.h?"""
    # distutils here is setuptools' own copy (setuptools is imported first).
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    with tempfile.TemporaryDirectory(prefix="doproxy-probe-") as tmp:
        source = Path(tmp, "probe.c")
        source.write_text("#include <Python.h>\nint doproxy_probe(void) { return 0; }\n")
        compiler = new_compiler()
        customize_compiler(compiler)
        try:
            objects = compiler.compile(
                [str(source)], output_dir=tmp, include_dirs=[sysconfig.get_path("include")]
            )
            compiler.link_shared_object(objects, str(Path(tmp, "probe.so")))
        except Exception as e:  # CompileError, LinkError, "command not found": all mean no
            _say(f"cannot build a C extension here ({e}); using pure Python")
            return False
    return True


def compile_wanted() -> bool:
    if os.environ.get("DOPROXY_PURE_PYTHON"):
        _say("DOPROXY_PURE_PYTHON is set; using pure Python")
        return False
    if find_spec("mypyc") is None:
        _say("mypyc is not installed; using pure Python")
        return False
    return can_build_extensions()


class DoproxyDistribution(Distribution):
    """Has extension modules exactly when the data plane will be compiled.

    bdist_wheel asks this before anything is built, to tag the wheel; build asks it to decide
    whether build_ext runs at all.
    """

    _compile: bool | None = None

    def has_ext_modules(self) -> bool:
        if self._compile is None:
            self._compile = compile_wanted()
        return self._compile


class BuildExt(build_ext):
    def finalize_options(self) -> None:
        dist = self.distribution
        if not dist.ext_modules and dist.has_ext_modules():
            dist.ext_modules = mypyc_extensions()
        super().finalize_options()


def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify

        # One group: calls between the modules are native C calls. The group name puts its
        # shared library inside the package instead of at the top level.
        extensions = mypycify(compiled_modules(), opt_level="3", group_name="doproxy.dataplane")
    except Exception as e:  # mypyc refusing the code: ship pure Python
        _say(f"not compiling the data plane ({e}); using pure Python")
        return []
    for ext in extensions:
        # A compiler that passed the probe but fails on the generated code (a newer compiler's
        # new warning under mypyc's -Werror, say): build_ext skips it and pure Python remains.
        ext.optional = True
    return extensions


setup(distclass=DoproxyDistribution, cmdclass={"build_ext": BuildExt})
