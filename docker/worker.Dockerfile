# A GPU worker: CUDA torch. One container per GPU (`cellfuse worker --queue gpu`).
# The CUDA torch wheel brings its CUDA runtime as pip packages; the host's driver comes in through the
# NVIDIA container toolkit. So the base is the same Python 3.11 as the API image and the lock.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/cellfuse
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# Then requirements.lock without its torch line (the CUDA build above stays), as a constraint on the
# runtime dependencies.
COPY requirements.lock ./
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt
COPY pyproject.toml setup.py MANIFEST.in README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY models_zoo ./models_zoo
COPY alembic ./alembic
RUN pip install -c /tmp/constraints.txt . && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 cellfuse && mkdir -p /data && chown cellfuse /data
USER cellfuse
# A GPU worker must compute on its GPU: "cuda" fails clearly where none is visible instead of
# silently running on the CPU. For several GPUs in one container: `cellfuse worker --gpus 0,1`.
ENV CELLFUSE_DATA_DIR=/data CELLFUSE_DEVICE=cuda
HEALTHCHECK --start-period=120s CMD ["cellfuse", "worker-health", "--max-age", "60"]
CMD ["cellfuse", "worker", "--queue", "gpu"]
