# loragate on a CUDA host. The base image brings Python 3.11 with a CUDA build of torch (and triton),
# so `pip install .` only adds loragate and its light dependencies.
#
#   docker build -t loragate .
#   docker run --gpus all -p 8000:8000 loragate            # the built-in demo model and adapters
#   docker run --gpus all -p 8000:8000 -v /path/to/model:/models/base -v /path/to/adapters:/adapters \
#       loragate --model /models/base --adapter-dir /adapters
#
# Any other `loragate serve` flag (--api-key, --max-loras, ...) goes after the image name.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/loragate
COPY . .
# The check runs outside the source tree, so it proves the demo weights were installed as package data.
RUN pip install . && cd / && python -c "from loragate.demo import demo_paths; demo_paths()"

EXPOSE 8000
VOLUME ["/models", "/adapters"]

ENTRYPOINT ["loragate", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []  # no arguments: serve the demo
