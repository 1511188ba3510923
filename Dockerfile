# The distml image (CPU): every step of the pipeline, the trainer pods, the model server and the MLflow server.
#   docker build -t distml:0.1.0 .
# Python 3.11 as the project requires; torch's CPU wheel from PyTorch's index (PyPI's Linux wheel carries CUDA).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/distml
RUN /opt/distml/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The ray extra: the pods of distml k8s render --engine ray run `ray start` from this image.
RUN /opt/distml/bin/pip install '.[ray]'

FROM python:3.11-slim
COPY --from=build /opt/distml /opt/distml
ENV PATH=/opt/distml/bin:$PATH PYTHONUNBUFFERED=1 DISTML_HOME=/workspace
# A non-root user; the pods' fsGroup (1000) lets it write the workspace volume.
RUN useradd --create-home --uid 1000 distml && mkdir /workspace && chown 1000:1000 /workspace
USER 1000
WORKDIR /workspace
EXPOSE 8080
ENTRYPOINT ["distml"]
CMD ["--help"]
