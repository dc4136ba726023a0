# HeadCNI container image: the static headcni binary on PATH, and nothing else.
#
# Build it from the repository root, after the static build:
#
#   cargo build --release --locked --target x86_64-unknown-linux-musl
#   podman build -t headcni:dev .          # or: docker build -t headcni:dev .
#
# (`just image` builds and checks it.) Another architecture's binary is named by BINARY, for
# example for arm64 (the release workflow builds each architecture so, then joins them into one
# multi-arch image):
#
#   cargo build --release --locked --target aarch64-unknown-linux-musl
#   docker build --platform linux/arm64 \
#       --build-arg BINARY=target/aarch64-unknown-linux-musl/release/headcni -t headcni:dev-arm64 .
#
# One stage and one COPY: every builder (BuildKit, buildah/podman, the classic builder) builds
# it the same way, with no base image and no network. .dockerignore keeps the build context to
# the static binaries (target/ alone holds gigabytes).
#
# The image holds no headcni-ipam link: inside the image only `headcni` runs (agent, install,
# status, teardown); `headcni install` creates the link next to the copy it puts on the node.

FROM scratch

ARG BINARY=target/x86_64-unknown-linux-musl/release/headcni
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="headcni" \
      org.opencontainers.image.description="Kubernetes pod networking over a Tailscale tailnet coordinated by Headscale: CNI plugin, IPAM, node agent and installer in one static binary" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/headcni/headcni" \
      org.opencontainers.image.documentation="https://github.com/headcni/headcni#readme"

COPY ${BINARY} /bin/headcni

# `kubectl exec ds/headcni -- headcni status` finds the binary by name.
ENV PATH=/bin

# Root, without extra capabilities unless the pod spec grants them: the installer writes
# root-owned host directories and tailscaled's LocalAPI takes changes from root only. The chart
# drops every capability a container does not need and mounts the root filesystem read-only.
USER 0:0
ENTRYPOINT ["/bin/headcni"]
CMD ["version"]
