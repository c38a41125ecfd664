# cellrcnn service on a CPU: the HTTP API and web page with the shipped models inside.
#   docker build -t cellrcnn .
#   docker run --rm -p 8000:8000 cellrcnn            # then open http://localhost:8000
# Options of `cellrcnn serve` go after the image name, e.g. `docker run ... cellrcnn --workers 2`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch wheels: the default ones bring about 3 GB of GPU libraries a CPU server never uses
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cellrcnn ./cellrcnn
# a regular (non-editable) install: the package, its configs, the web page and the shipped
# models (cellrcnn/weights/*.ckpt) land in site-packages; the sources are removed afterwards
RUN pip install ".[serve]" && rm -rf /src \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cellrcnn

USER cellrcnn
WORKDIR /home/cellrcnn
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["cellrcnn", "serve", "--host", "0.0.0.0", "--port", "8000"]
