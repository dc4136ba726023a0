# Everyday recipes. `just` (https://just.systems, `cargo install just`) runs them; each is a
# plain command line too.

musl := "x86_64-unknown-linux-musl"

# List the recipes.
default:
    @just --list

# The static binary that ships: target/x86_64-unknown-linux-musl/release/headcni.
build:
    rustup target list --installed | grep -qx {{musl}} || rustup target add {{musl}}
    cargo build --release --locked --target {{musl}}

# Put the binary, the headcni-ipam link and the conflist on this node (as root).
install *ARGS: build
    target/{{musl}}/release/headcni install {{ARGS}}

# Remove what `just install` put in place.
uninstall *ARGS:
    target/{{musl}}/release/headcni install --uninstall {{ARGS}}

# Unit, property and namespace tests (as root for the namespace tests).
test:
    cargo test --locked

# The whole suite, as CI runs it (as root; installs what it needs).
test-all *ARGS:
    integration/test-all.sh {{ARGS}}

# Formatting, clippy, the module boundaries of ARCHITECTURE.md, shellcheck, and actionlint (the
# pinned one integration/lib/peers.sh builds).
lint:
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings
    cargo test --locked --test boundaries
    shellcheck -x -P SCRIPTDIR integration/*.sh integration/lib/*.sh bench/*.sh deploy-with-helm.sh
    bash -c 'source integration/lib/peers.sh && peers_build_checkers && "$ACTIONLINT_BIN" .github/workflows/*.yml'

# Benchmarks against the reference plugins (as root); results go to BENCHMARKS.md by hand.
bench:
    bench/plugin.sh
    bench/ipam.sh

# Two nodes on a real tailnet with pods, a ping table, metrics and status (as root).
demo *ARGS:
    integration/demo.sh {{ARGS}}

# The container image, built offline with podman and run.
image:
    integration/image-check.sh

# Helm lint, templates for several value sets, schema validation, deploy script checks.
chart:
    integration/chart-check.sh
