# A GPU worker: CUDA runtime + CUDA torch. One container per GPU (`cellfuse worker --queue gpu`).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/cellfuse
RUN pip3 install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY models_zoo ./models_zoo
COPY alembic ./alembic
RUN pip3 install -e . && useradd --system --uid 10001 cellfuse && mkdir -p /data && chown cellfuse /data
USER cellfuse
# A GPU worker must compute on its GPU: "cuda" fails clearly where none is visible instead of
# silently running on the CPU. For several GPUs in one container: `cellfuse worker --gpus 0,1`.
ENV CELLFUSE_DATA_DIR=/data CELLFUSE_DEVICE=cuda
CMD ["cellfuse", "worker", "--queue", "gpu"]
