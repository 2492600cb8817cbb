# xenemu: the hypervisor daemon (and the scenario programs in /app/clients).
# The first stage compiles the fast path of do_iommu_op into a wheel; the image keeps no compiler.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The distribution's current gcc is what builds the wheel; pinning it would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml hatch_build.py README.md PROTOCOL.md ./
COPY abi ./abi
COPY xenemu ./xenemu
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 xen \
    && mkdir -p /run/xenemu \
    && chown xen:xen /run/xenemu

WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY clients ./clients

USER 10001:10001
VOLUME ["/run/xenemu"]
ENTRYPOINT ["xenemu", "--dir", "/run/xenemu"]
CMD ["serve"]
