# xenemu: the hypervisor daemon (and the scenario programs in /app/clients).
# The first stage compiles the fast path of do_iommu_op into a wheel; the image keeps no compiler.
# Layers run from the least to the most often changed: the compiler, then the dependencies (read
# from pyproject.toml's metadata alone, so a source edit reuses them), then xenemu itself.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The distribution's current gcc is what builds the wheel; pinning it would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; m = tomllib.load(open('pyproject.toml', 'rb')); \
open('build-requirements.txt', 'w').write('\n'.join(m['build-system']['requires'])); \
open('requirements.txt', 'w').write('\n'.join(m['project']['dependencies']))" \
    && pip install --no-cache-dir -r build-requirements.txt \
    && pip wheel --no-cache-dir --wheel-dir /deps -r requirements.txt

# Everything .dockerignore lets in: what the wheel needs, whatever pyproject.toml names.
COPY . ./
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 xen \
    && mkdir -p /run/xenemu \
    && chown xen:xen /run/xenemu

WORKDIR /app
COPY --from=build /deps /deps
RUN pip install --no-cache-dir --no-index /deps/*.whl && rm -rf /deps
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && rm -rf /wheels
COPY clients ./clients

USER 10001:10001
VOLUME ["/run/xenemu"]
# Healthy once the daemon answers on its control socket (`xenemu info` asks it for the host).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["xenemu", "--dir", "/run/xenemu", "info"]
ENTRYPOINT ["xenemu", "--dir", "/run/xenemu"]
CMD ["serve"]
