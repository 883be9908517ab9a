# loragate on a CUDA host. The base image brings Python 3.11 (with its C headers) and a CUDA build
# of torch and triton, so `pip install .` only adds loragate and its light dependencies.
#
#   docker build -t loragate .
#   docker run --gpus all -p 8000:8000 loragate            # the built-in demo model and adapters
#   docker run --gpus all -p 8000:8000 -v /path/to/model:/models/base -v /path/to/adapters:/adapters \
#       loragate --model /models/base --adapter-dir /adapters
#
# Any other `loragate serve` flag (--api-key, --max-loras, ...) goes after the image name.
# scripts/docker_smoke.sh builds and runs it and streams one request per demo model.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive

# A C compiler: Triton compiles a small C launcher for every kernel the first time it runs, and the
# runtime images carry none ("Failed to find C compiler" on the first adapter request otherwise).
# g++ builds the native CPU kernels (loragate/kernels/csrc) when the image runs with --device cpu.
# About 250 MB installed (~70 MB compressed) on a ~7.5 GB image; the -devel base would add ~5 GB.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loragate
COPY pyproject.toml README.md ./
COPY loragate ./loragate
# The check runs outside the source tree, so it proves the demo weights were installed as package data.
RUN pip install . && cd / && python -c "from loragate.demo import demo_paths; demo_paths()"

# Not root. Triton's kernel cache (~/.triton) and the native kernels' (~/.cache/loragate) live in
# its home; mount a volume there to keep compiled kernels across containers.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin loragate \
    && mkdir -p /models /adapters && chown loragate:loragate /models /adapters
USER loragate
ENV HOME=/home/loragate
WORKDIR /home/loragate

EXPOSE 8000
VOLUME ["/models", "/adapters"]

# /health turns 200 once the model is loaded and the kernels passed their start-up self-check, and
# 503 if the engine dies. The start period covers loading a large model and compiling kernels once.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

ENTRYPOINT ["loragate", "serve", "--host", "0.0.0.0", "--port", "8000"]
# No arguments: serve the demo. (A comment after the JSON would make it shell form: an argument.)
CMD []
