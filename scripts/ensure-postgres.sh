#!/usr/bin/env bash
# Makes sure the PostgreSQL that tests use answers on $PGHOST:$PGPORT, starting the machine's cluster if needed.
set -euo pipefail
host=${PGHOST:-127.0.0.1}
port=${PGPORT:-5432}
if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  exit 0
fi
echo "PostgreSQL is not answering on $host:$port; starting the local cluster" >&2
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
fi
for _ in $(seq 1 30); do
  pg_isready -q -h "$host" -p "$port" 2>/dev/null && exit 0
  sleep 1
done
echo "error: PostgreSQL did not come up on $host:$port (start it, or set PGHOST/PGPORT)" >&2
exit 1
