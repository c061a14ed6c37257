# smash-build production image: the slim runtime + one baked artifact, served by smash-serve.
#
# This file is the template. `smash-build image ARTIFACT --tag TAG` (or `--context-only DIR`)
# writes a build context around a copy of it with every ARG default below filled in:
#
#   Dockerfile                                   this file, defaults set
#   wheelhouse/deps/   (ARG WHEELHOUSE)          hash-locked wheels of every dependency: requirements.lock,
#                                                tools.lock (the pip wheel that installs them), *.whl
#   wheelhouse/app/                              the smash-runtime wheel and its one-line lock
#   layers/artifact/opt/smash/artifact/...       (ARG ARTIFACT) the artifact, nested so that `COPY dir/ /`
#                                                creates no directory (created directories get the build's
#                                                clock as mtime, which breaks layer reproducibility)
#   layers/compile-cache/...  (ARG COMPILE_CACHE) torch compile cache to bake in (often empty)
#
# Layers of the final image, in order (docs/container.md explains the choice):
#   base (python3) | dependencies (venv + service user) | weights | smash-runtime | compile cache | metadata
# - new runtime code: only the small smash-runtime layer is rebuilt; dependencies and weights come
#   from the build cache, and machines that pulled the previous image fetch only that small layer.
# - new weights: the dependencies come from the build cache and are a prefix shared by every model
#   built with the same lock (pulled once per machine); smash-runtime is copied again, with the same
#   digest as before.
# - new dependencies (rare): everything above the base is rebuilt; the weights layer gets the same
#   digest, so a registry that holds it does not receive it again.
# Needs no package index, CA bundle or token: pip installs only the wheels in wheelhouse/, by hash.

# Any Debian-like image with python3 whose version matches the wheelhouse: the local
# smash-base:bookworm-py311 (.ci/base-image.sh), python:3.11-slim-bookworm, or for GPUs a CUDA PyTorch
# base with VENV_OPTIONS=--system-site-packages and a wheelhouse resolved with variant "cuda".
ARG BASE_IMAGE=smash-base:bookworm-py311

FROM ${BASE_IMAGE} AS runtime-builder
ARG WHEELHOUSE=wheelhouse
ARG VENV_OPTIONS=
# mtime of every file in the code layers. Not the artifact's date: these layers must not depend
# on the artifact, so that every model built with the same lock shares them.
ARG CODE_EPOCH=315532800
ARG SERVICE_UID=10001
# 1: compile byte code at build time (faster starts); 0: compile in memory at each start.
ARG PRECOMPILE=1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
# This stage is discarded: the wheelhouse, the locks and pip itself never reach the final image.
# Dependencies first, in their own step, so new runtime code reuses this (slow) install.
COPY ${WHEELHOUSE}/deps/ /tmp/wheels/
WORKDIR /tmp/wheels
# pip runs from its own wheel (the base needs no pip), whose hash tools.lock pins. It installs
# under /out as if into /opt/smash/venv (--root), so the final stage copies one tree onto /.
# Byte code: compiled after the install with hash-based invalidation (no mtimes inside .pyc; the
# service user cannot write to the venv) and /opt paths (-s/-p) for tracebacks. Files written for
# a newer Python (torch ships a few) cannot compile and stay source-only.
RUN sha256sum -c tools.lock \
    && python3 -m venv --without-pip ${VENV_OPTIONS} /opt/smash/venv \
    && set -- /tmp/wheels/pip-*.whl \
    && /opt/smash/venv/bin/python "$1/pip" install --root /out --no-index --require-hashes --no-compile \
        --no-warn-script-location --find-links /tmp/wheels -r requirements.lock \
    && cp -a /opt/smash/venv/. /out/opt/smash/venv/ \
    && if [ "${PRECOMPILE}" = 1 ]; then \
        /opt/smash/venv/bin/python -m compileall -q -j 0 --invalidation-mode checked-hash -s /out -p / \
            -x '/(tests?|testing)/' /out/opt/smash/venv/lib \
        || echo "note: the files above are not valid for this Python and stay uncompiled"; fi \
    && mkdir -p /out/etc /out/home/smash \
    && cp /etc/passwd /etc/group /out/etc/ \
    && echo "smash:x:${SERVICE_UID}:${SERVICE_UID}:smash service:/home/smash:/usr/sbin/nologin" >> /out/etc/passwd \
    && echo "smash:x:${SERVICE_UID}:" >> /out/etc/group \
    && chown "${SERVICE_UID}:${SERVICE_UID}" /out/home/smash \
    && find /out -exec touch -h -d "@${CODE_EPOCH}" {} +
# Then smash-runtime itself: a small layer of its own.
COPY ${WHEELHOUSE}/app/ /tmp/app/
RUN set -- /tmp/wheels/pip-*.whl \
    && /opt/smash/venv/bin/python "$1/pip" install --root /out-app --no-deps --no-index --require-hashes \
        --no-compile --no-warn-script-location --find-links /tmp/app -r /tmp/app/requirements.lock \
    && if [ "${PRECOMPILE}" = 1 ]; then \
        /opt/smash/venv/bin/python -m compileall -q --invalidation-mode checked-hash -s /out-app -p / /out-app; fi \
    && find /out-app -exec touch -h -d "@${CODE_EPOCH}" {} +

# The compile cache must be writable by the service, but `COPY --chown` into the image would also
# chown /opt and stamp the folder with the build's clock: stage it here with fixed owners and times.
FROM ${BASE_IMAGE} AS compile-cache
ARG COMPILE_CACHE=layers/compile-cache
ARG CODE_EPOCH=315532800
ARG SERVICE_UID=10001
COPY ${COMPILE_CACHE}/ /out/opt/smash/compile-cache/
RUN chown -R "${SERVICE_UID}:${SERVICE_UID}" /out/opt/smash/compile-cache \
    && chown 0:0 /out /out/opt /out/opt/smash \
    && chmod -R u+rwX,go+rX,go-w /out \
    && find /out -exec touch -h -d "@${CODE_EPOCH}" {} +

FROM ${BASE_IMAGE}
ARG ARTIFACT=layers/artifact
ARG SERVICE_UID=10001
# 1. dependencies: the venv (every dependency, no smash-runtime), service user, writable home.
COPY --from=runtime-builder /out/ /
# 2. weights: the artifact's files; the same bytes whatever is around them.
COPY ${ARTIFACT}/ /
# 3. app: smash-runtime (small; the only layer new runtime code changes).
COPY --from=runtime-builder /out-app/ /
# 4. compile cache (often empty): torch/GPU specific, so after the runtime.
COPY --from=compile-cache /out/ /

# Everything below is image metadata, no layers, so changing a label rebuilds nothing above.
ENV PATH=/opt/smash/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/smash \
    HF_HOME=/home/smash/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMASH_HOST=0.0.0.0 \
    SMASH_PORT=8000 \
    SMASH_COMPILE_CACHE=/opt/smash/compile-cache
USER ${SERVICE_UID}:${SERVICE_UID}
WORKDIR /home/smash
EXPOSE 8000
# Liveness only (/health); orchestrators should gate traffic on /ready. Loading plus warm-up of a
# large model takes minutes on a cold start, hence the long start period. SMASH_PORT may be overridden.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SMASH_PORT', '8000'), timeout=4)"]

ARG SOURCE_URL=
ARG REVISION=
ARG CREATED=1980-01-01T00:00:00Z
ARG VERSION=
ARG ARTIFACT_SHA256=
ARG ARTIFACT_SOURCE=
ARG ARTIFACT_SOURCE_REVISION=
ARG LOCK_SHA256=
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="smash-serve" \
      org.opencontainers.image.description="smash-build artifact served by smash-runtime" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.smash.artifact.sha256="${ARTIFACT_SHA256}" \
      io.smash.artifact.source="${ARTIFACT_SOURCE}" \
      io.smash.artifact.source.revision="${ARTIFACT_SOURCE_REVISION}" \
      io.smash.lock.sha256="${LOCK_SHA256}"
ENTRYPOINT ["smash-serve", "/opt/smash/artifact"]
