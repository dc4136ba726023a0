# HeadCNI container image: the static headcni binary, its headcni-ipam link,
# and nothing else.
#
# The build context is a staging directory rather than the repository, because
# COPY cannot create the `headcni-ipam -> headcni` symlink that the multi-call
# binary dispatches on:
#
#   cargo build --release --target x86_64-unknown-linux-musl
#   mkdir -p target/image/rootfs
#   install -m 0755 target/x86_64-unknown-linux-musl/release/headcni target/image/rootfs/headcni
#   ln -sfn headcni target/image/rootfs/headcni-ipam
#   podman build -f Dockerfile -t headcni:dev target/image     # or: docker build
#
# integration/image-check.sh does exactly this, offline, and runs the image.
#
# Variant for places that can pull a Rust toolchain image: build the binary in
# an earlier stage (build context: the repository root) and replace the COPY
# below with `COPY --from=build /rootfs/ /`:
#
#   FROM docker.io/library/rust:1-alpine AS build
#   RUN apk add --no-cache musl-dev
#   WORKDIR /src
#   COPY . .
#   RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
#    && mkdir /rootfs \
#    && install -m 0755 target/x86_64-unknown-linux-musl/release/headcni /rootfs/headcni \
#    && ln -s headcni /rootfs/headcni-ipam

FROM scratch

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

COPY rootfs/ /

# Root, without extra capabilities unless the pod spec grants them: the
# installer writes root-owned host directories and tailscaled's LocalAPI takes
# changes from root only. The chart drops every capability a container does
# not need and mounts the root filesystem read-only.
USER 0:0
ENTRYPOINT ["/headcni"]
CMD ["version"]
