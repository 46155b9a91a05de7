"""CUDA C sources of the cupy backend (package data: ``*.cu``, ``*.cuh``)."""
