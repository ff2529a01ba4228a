"""Build script: the package is pure Python until the C++/CUDA extensions in csrc/ are added."""

from setuptools import setup

setup()
