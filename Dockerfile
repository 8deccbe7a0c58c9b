# hywia-serve on a GPU, with the vLLM (CUDA) flavour.
#
#   docker build -t hywia-serve .
#   docker run --gpus all -p 8000:8000 -v hywia-cache:/cache -e HYWIA_API_KEY=secret hywia-serve [SOURCE] [FLAGS]
#
# The pruned export (and the default model) are written to the /cache volume, so a restart with the
# same options loads the export instead of pruning again. Every command below is one that the
# Makefile runs (`make venv`, `hywia serve`); the image adds no steps of its own.
FROM python:3.11-slim-bookworm

# make runs the install; the CUDA libraries come with the torch and vLLM wheels, and the NVIDIA
# container runtime provides the driver.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 hywia \
    && mkdir /cache && chown hywia:hywia /cache

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY scripts scripts
COPY hywia hywia
COPY server server
# A build has no GPU to detect, so the flavour is named (scripts/install.sh reads HYWIA_FLAVOUR).
RUN HYWIA_FLAVOUR=vllm make venv

USER hywia
ENV HYWIA_CACHE_DIR=/cache PATH=/app/.venv/bin:$PATH
VOLUME /cache
EXPOSE 8000

# 503 while loading, pruning or starting the engine, 200 once serving. Pruning a 7B model takes a
# while on first start, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Inside a container the port must be reachable from outside it; set HYWIA_API_KEY to protect /v1.
ENTRYPOINT ["hywia", "serve", "--host", "0.0.0.0", "--port", "8000"]
