"""Triton kernels for the twa:: ops (backend "triton")."""
