"""equipipe: measure how fast non-equivariant molecular models learn rotational equivariance."""

__version__ = "0.1.0"
