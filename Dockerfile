# The rehydrate image: the package and its `rehydrate` command on slim Python, run as a non-root user.
# Default command: a worker (configure it with REHYDRATE_* variables; see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them. The otel extra
# lets REHYDRATE_TRACING=otlp work in the image.
COPY pyproject.toml ./
RUN mkdir rehydrate && touch rehydrate/__init__.py \
    && pip install '.[otel]' \
    && pip uninstall -y rehydrate \
    && rm -rf rehydrate build *.egg-info

# Then the package itself (not editable: the image holds no source tree that it depends on).
COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

RUN useradd --create-home --uid 10001 --user-group rehydrate
USER rehydrate
WORKDIR /home/rehydrate

ENTRYPOINT ["rehydrate"]
CMD ["worker"]
