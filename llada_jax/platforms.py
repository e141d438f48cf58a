"""Which JAX platforms to start: all that are present, and never libtpu's on a host without a TPU.

Installed libtpu (the test extra brings it) probes for a TPU at JAX's first device query and, on a
host without one, prints several error lines (host bounds, TPU_WORKER_HOSTNAMES). `choose()` runs
before JAX starts: with JAX_PLATFORMS unset and no TPU device on the host it names the platforms
that are there (a GPU's, then cpu). An explicit JAX_PLATFORMS is left as it is.
"""

from __future__ import annotations

import glob
import importlib.util
import os

# Device files of a TPU VM: /dev/accel* (v2 - v4), /dev/vfio/<n> (v5e, v5p, v6e).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
# (device files, the JAX plugin modules that drive them, JAX's platform name)
GPU_PLATFORMS = ((("/dev/nvidia[0-9]*",), ("jax_cuda12_plugin", "jax_cuda13_plugin"), "cuda"),
                 (("/dev/kfd",), ("jax_rocm60_plugin", "jax_rocm7_plugin"), "rocm"))


def tpu_present() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose(environ=os.environ) -> None:
    """Sets JAX_PLATFORMS when libtpu is installed, no TPU is present and none was asked for."""
    if "JAX_PLATFORMS" in environ or tpu_present() or not _installed("libtpu"):
        return
    gpus = [name for files, plugins, name in GPU_PLATFORMS
            if any(glob.glob(f) for f in files) and any(map(_installed, plugins))]
    environ["JAX_PLATFORMS"] = ",".join([*gpus, "cpu"])
