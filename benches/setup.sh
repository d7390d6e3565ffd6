#!/usr/bin/env bash
# Installs the third-party tools the L4 and TLS benchmarks
# (`cargo bench --bench l4`, `cargo bench --bench tls`) compare fleetgate
# against and drive the load with. Debian bookworm, as root.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# libnginx-mod-stream ships ngx_stream_module.so; nginx-light/core alone
# would not be able to load a `stream {}` block.
$SUDO apt-get install -y --no-install-recommends \
    haproxy nginx libnginx-mod-stream wrk iperf3 openssl
# openssl: both benches generate their certificates with it. The TLS load
# with client certificates, without resumption and the idle connections come
# from the bench's own rustls client; wrk does https (keep-alive, conn-close).

# The Debian packages start system services bound to :80; the benchmark
# runs its own private instances, so stop those to leave the host quiet.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nginx haproxy iperf3 2>/dev/null || true
else
    $SUDO service nginx stop 2>/dev/null || true
    $SUDO service haproxy stop 2>/dev/null || true
fi

echo "benchmark tools installed:"
for t in haproxy nginx wrk iperf3 openssl; do printf '  %-8s %s\n' "$t" "$(command -v "$t")"; done
