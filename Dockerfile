# xenemu: the hypervisor daemon (and the scenario programs in /app/clients).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 xen \
    && mkdir -p /run/xenemu \
    && chown xen:xen /run/xenemu

WORKDIR /app
COPY pyproject.toml README.md PROTOCOL.md ./
COPY abi ./abi
COPY xenemu ./xenemu
COPY clients ./clients
RUN pip install --no-cache-dir /app

USER 10001:10001
VOLUME ["/run/xenemu"]
ENTRYPOINT ["xenemu", "--dir", "/run/xenemu"]
CMD ["serve"]
