"""The GPU runtime image (EXTRA=gpu: onnxruntime-gpu with the CUDA and cuDNN libraries as pip packages),
built with podman from the repository's Dockerfile. On a host without a GPU (CI, the development
machine) it cannot serve, and must say so: started with ``FACE_REQUIRE_GPU=true`` it exits non-zero
with a message that names the missing GPU, instead of serving on the CPU.

The build downloads a few GB of NVIDIA wheels once (podman's layer cache keeps them); marked
``gpu_image`` (and ``container``) so that ``-m "not gpu_image"`` leaves it out.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.deploy.conftest import build_runtime_image

pytestmark = [pytest.mark.container, pytest.mark.gpu_image]

GPU_IMAGE = "localhost/face-embedding-service:gpu-test"

PROBE = """
import importlib.metadata as md, onnxruntime as ort
names = {d.metadata["Name"].lower() for d in md.distributions()}
print("onnxruntime-gpu" in names, "onnxruntime" in names, "CUDAExecutionProvider" in ort.get_available_providers())
"""


def _host_has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def gpu_image(podman) -> str:
    return build_runtime_image(podman, GPU_IMAGE, extra="gpu", timeout=3000)


def test_gpu_image_carries_onnxruntime_gpu_only(podman, gpu_image):
    """onnxruntime-gpu and onnxruntime install the same module: the image has the GPU one, alone."""
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python", gpu_image, "-c", PROBE).stdout
    assert out.split() == ["True", "False", "True"], out


def test_gpu_image_without_a_gpu_refuses_to_start(podman, gpu_image):
    if _host_has_gpu():
        pytest.skip("this host has a GPU: the refusal is for GPU-less hosts")
    result = podman("run", "--rm", "--network", "none", "-e", "FACE_REQUIRE_GPU=true", "-e", "FACE_LOG_JSON=false",
                    gpu_image, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "no usable GPU" in output, output[-3000:]
    assert "Uvicorn running" not in output and "Application startup complete" not in output, output[-3000:]
