#!/usr/bin/env bash
# Installs a built `shoal` binary and the systemd unit on this machine.
# Usage: sudo ./deploy/install.sh [path/to/shoal]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/shoal}"
install -m 755 "$bin" /usr/local/bin/shoal
id shoal >/dev/null 2>&1 || useradd --system --home /var/lib/shoal --shell /usr/sbin/nologin shoal
install -d -o shoal -g shoal -m 750 /etc/shoal /var/lib/shoal
[ -f /etc/shoal/shoal.toml ] || install -m 640 -o shoal -g shoal deploy/shoal.example.toml /etc/shoal/shoal.toml
install -m 644 deploy/shoal.service /etc/systemd/system/shoal.service
# A node asks for a 4 MiB UDP receive buffer (a burst of client handshakes
# waits in it instead of being dropped); the kernel caps it at rmem_max,
# 208 KiB by default. Raise the cap, never lower one already higher.
if [ "$(sysctl -n net.core.rmem_max)" -lt 4194304 ]; then
    echo "net.core.rmem_max = 4194304" > /etc/sysctl.d/60-shoal.conf
    sysctl -q -p /etc/sysctl.d/60-shoal.conf || echo "could not raise net.core.rmem_max: a node warns at start" >&2
fi
systemctl daemon-reload
echo "edit /etc/shoal/shoal.toml, put the certificates in /etc/shoal, then: systemctl enable --now shoal"
