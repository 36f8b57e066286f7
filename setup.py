"""Metadata lives in pyproject.toml; this only installs ``uti_peft.pth`` (see uti_peft_autoload.py) at the root of
site-packages, for regular and editable installs alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "uti_peft.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # an editable wheel is assembled in install_lib, a regular one from build_lib
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
