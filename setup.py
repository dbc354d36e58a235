from setuptools import setup

setup(cffi_modules=["cshim/build_shim.py:ffibuilder", "cshim/build_fast_path.py:ffibuilder"])
