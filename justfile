# Everyday recipes. The README's two commands stay plain cargo, so `just` is optional.

default:
    @just --list

# The proxy in front of the simulated NVIDIA API with generated keys
dev:
    cargo run --release -p proxypal-server -- --dev

# Run with a config file (keys from the file, PROXYPAL_KEYS or .env)
run config="proxypal.yaml":
    set -a; [ -f .env ] && . ./.env; set +a; cargo run --release -p proxypal-server -- --config {{config}}

# Validate a config and print its summary (keys masked)
check config="proxypal.yaml":
    cargo run --release -p proxypal-server -- --config {{config}} --check

# The README's test command
test:
    cargo test --workspace

# fmt + clippy + rustdoc, as CI runs them
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Everything CI runs
ci:
    bash .ci/run

# The selection-path benchmark
bench:
    cargo bench --bench selection

# Build the container image (needs a Docker engine)
docker:
    docker build -t proxypal:latest .
