"""Installs `mwjax-lm-eval.pth` beside the packages (normal and editable installs alike).

The .pth line runs at interpreter start-up and, only in `lm_eval` / `lm-eval` processes, registers
the `mwjax` backend with lm-evaluation-harness (which has no plugin discovery of its own), so that
`lm_eval --model mwjax ...` works from the shell. Everything else is in pyproject.toml.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "mwjax-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
