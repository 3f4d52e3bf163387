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

# ProxyPal beside nginx (and LiteLLM with LITELLM=1): wrk, SSE timings, bursts (benches/peers/)
bench-peers repeat="3":
    cargo build --release -p proxypal-server
    PROXYPAL_BIN=$PWD/target/release/proxypal-server TARGETS="direct nginx proxypal $([ "${LITELLM:-0}" = 1 ] && echo litellm)" REPEAT={{repeat}} bash benches/peers/run_peers.sh

# Everything: build, peer harness, quota test, memory, binary size; ends with one SUMMARY line
bench-all:
    bash benches/run.sh

# Build the container image (needs a Docker engine)
docker:
    docker build -t proxypal:latest .
