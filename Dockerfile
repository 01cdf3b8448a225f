# GPU image (default): CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu.
#   docker build -t scoring .
# CPU image: a slim Python base and the CPU-only onnxruntime wheel.
#   docker build -t scoring:cpu --build-arg BASE=python:3.11-slim-bookworm --build-arg ORT_PACKAGE=onnxruntime .
# Run with the model repository mounted as a volume:
#   docker run -p 50051:50051 -p 9100:9100 -v $PWD/model_repo:/models scoring
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE} AS build
ARG ORT_PACKAGE=onnxruntime-gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN if ! command -v python3 >/dev/null; then apt-get update && apt-get install -y --no-install-recommends \
      python3 python3-venv && rm -rf /var/lib/apt/lists/*; fi; \
    if ! python3 -m venv --help >/dev/null 2>&1; then apt-get update && apt-get install -y --no-install-recommends \
      python3-venv && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /app
COPY requirements.txt .
RUN python3 -m venv /opt/venv \
 && sed -i "s/^onnxruntime-gpu==/${ORT_PACKAGE}==/" requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt
COPY proto proto
RUN /opt/venv/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
      proto/scoring/v1/scoring.proto proto/scoring/v1/admin.proto \
 && touch scoring/__init__.py scoring/v1/__init__.py
COPY model_format model_format
COPY server server
COPY tools tools
COPY vocab vocab

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null; then apt-get update && apt-get install -y --no-install-recommends \
      python3 && rm -rf /var/lib/apt/lists/*; fi \
 && useradd --system --uid 10001 --no-create-home scoring
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 SCORING_MODEL_REPO=/models
VOLUME ["/models"]
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-m", "tools.healthcheck", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["python", "-m", "server"]
