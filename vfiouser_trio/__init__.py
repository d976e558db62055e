"""vfiouser_trio: the vfio-user protocol for Python on trio."""

__version__ = "0.1.0"
