# codellama-serve in a container. One image per accelerator (see deploy/README.md):
#   docker build -t codellama-jax:cpu .
#   docker build --build-arg ACCELERATOR=cuda12 -t codellama-jax:cuda12 .
#   docker build --build-arg ACCELERATOR=tpu -t codellama-jax:tpu .
# The image also carries the converter: docker run --entrypoint codellama-convert ... (Kubernetes:
# command: [codellama-convert]).
FROM python:3.11.17-slim-trixie

# cpu (default); cuda12: JAX's CUDA 12 wheels, which carry their own CUDA libraries (the node needs
# only the NVIDIA driver); tpu: JAX with libtpu
ARG ACCELERATOR=cpu

# /cache (a volume) holds XLA's compile cache (--compile-cache default /cache/codellama-jax/xla) and
# the demo model fetched when no --model is given
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    XDG_CACHE_HOME=/cache \
    CODELLAMA_CACHE=/cache/codellama-jax

WORKDIR /opt/codellama-jax
COPY pyproject.toml README.md ./
COPY codellama_jax codellama_jax
COPY convert convert
COPY serving serving

# a misspelt ACCELERATOR fails the build: pip would only warn about an unknown extra
RUN case "$ACCELERATOR" in \
        cpu) extra="" ;; \
        cuda12|tpu) extra="[$ACCELERATOR]" ;; \
        *) echo "ACCELERATOR must be cpu, cuda12 or tpu, not '$ACCELERATOR'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir "./$extra" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /cache codellama \
    && mkdir -p /cache \
    && chown codellama:codellama /cache

VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000

# No HEALTHCHECK: Kubernetes ignores it and probes /health itself, and the workers of a multi-host
# group serve no HTTP. Arguments replace CMD: keep --host 0.0.0.0 when giving others.
ENTRYPOINT ["codellama-serve"]
CMD ["--host", "0.0.0.0"]
