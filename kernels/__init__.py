"""Triton kernels for echox, installed as the package `echox_kernels` (the PyPI name `kernels`
belongs to another project). One file per kernel family, each with its launcher."""
