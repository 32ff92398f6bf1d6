# The API image: no GPU, no CUDA. Serves REST and the web page; enqueues work by task name.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/cellfuse
# CPU torch first, so that the cellpose dependency never pulls a CUDA build into the API image.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Every other runtime dependency at the version requirements.lock pins (the versions the tests passed
# with); the lock is a constraint, so the test tools it also pins stay out of the image.
COPY requirements.lock ./
COPY pyproject.toml setup.py MANIFEST.in README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY models_zoo ./models_zoo
COPY alembic ./alembic
# A regular (non-editable) install: the wheel carries the migrations and the web page.
RUN pip install -c requirements.lock . && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 cellfuse && mkdir -p /data && chown cellfuse /data
USER cellfuse
ENV CELLFUSE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["cellfuse", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-embedded-worker"]
