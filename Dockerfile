# Trajectome BIDS-App image.
#
#   docker build -t trajectome:latest \
#       --build-arg VERSION=$(git describe --tags --always) \
#       --build-arg VCS_REF=$(git rev-parse HEAD) \
#       --build-arg BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) .
#   docker run --rm -v /path/to/bids:/data:ro -v /path/to/out:/out \
#       trajectome:latest /data /out participant --participant-label 01
#
# Everything the app needs at run time is inside (Python packages, nilearn's bundled MNI
# templates and atlases, the BIDS validator); it never touches the network.
# BASE_IMAGE lets a local mirror of the Debian Python image stand in for Docker Hub's.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- requirements
# The runtime dependencies of pyproject.toml as a requirements file, in a stage of its own:
# the builder copies only that file, so a change elsewhere in pyproject.toml (version, test
# extras, ruff settings) keeps the ~1 GB dependency layer below cached.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; \
print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /src/requirements.txt

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/trajectome
ENV PATH=/opt/trajectome/bin:$PATH
WORKDIR /src

# Dependencies get their own layer, rebuilt only when the requirements or the constraints
# change, so editing the code does not reinstall them. The constraints pin the versions the
# test suite passed with (docker/update-constraints.sh), so the image computes the same numbers.
COPY --from=requirements /src/requirements.txt ./
COPY docker/constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

COPY pyproject.toml ./
COPY README.md ./
COPY pipeline ./pipeline
COPY workflows ./workflows
# No .git in the build context, so setuptools-scm cannot see the version: pass it in.
# setuptools-scm takes only PEP 440, and `git describe` gives a bare hash without tags.
ARG VERSION=""
COPY docker/pep440_version.py ./
RUN if [ -n "$VERSION" ]; then \
        SETUPTOOLS_SCM_PRETEND_VERSION=$(python pep440_version.py "$VERSION" pyproject.toml) \
        && export SETUPTOOLS_SCM_PRETEND_VERSION; \
    fi \
    && pip install -c constraints.txt . \
    && pip check \
    && trajectome --help > /dev/null

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=""
ARG VCS_REF=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="Trajectome" \
      org.opencontainers.image.description="BIDS-App: longitudinal functional and structural connectomes across ECT sessions" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

COPY docker/entrypoint.sh /usr/local/bin/trajectome-entrypoint
# tini reaps zombies and forwards signals (with -g, to the whole process group, i.e. the
# MultiProc workers too), so `docker stop` and Ctrl-C end a run promptly.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && chmod 0755 /usr/local/bin/trajectome-entrypoint \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/trajectome \
        --shell /bin/sh trajectome

COPY --from=builder /opt/trajectome /opt/trajectome

# One BLAS/OpenMP/ITK thread per process unless asked otherwise: the scheduler already runs
# --nprocs processes, and oversubscribing a shared node is worse than idle cores.
# NIPYPE_NO_ET stops Nipype's version check over the network; MPLCONFIGDIR and the other
# caches are moved somewhere writable by the entrypoint when HOME is not (any UID, Apptainer).
ENV PATH=/opt/trajectome/bin:$PATH \
    HOME=/home/trajectome \
    MPLCONFIGDIR=/home/trajectome/.config/matplotlib \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TINI_SUBREAPER=1

USER trajectome
WORKDIR /home/trajectome
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/trajectome-entrypoint"]
CMD ["--help"]
