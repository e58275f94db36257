#!/usr/bin/env bash
# The Debian packages of the services some tests start themselves, in temporary folders:
# PostgreSQL (tests marked postgres), SLURM with munge (tests marked cluster), and Chromium with
# its driver (tests marked browser). Without them those tests skip with a reason. Needs root or sudo; does nothing where all are installed.
set -euo pipefail
PACKAGES="postgresql slurm-wlm munge chromium chromium-driver"
if ! command -v apt-get >/dev/null; then
    echo "install-debian: no apt-get here; the postgres and cluster tests will skip" >&2
    exit 0
fi
missing=$(for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# the tests make their own database clusters: none from the package (an existing setting is kept)
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
# shellcheck disable=SC2086
$SUDO apt-get install -y --no-install-recommends $missing \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends $missing; }
