#!/usr/bin/env bash
# Install and start a local PostgreSQL for the devices module's store tests,
# and print the URL to put in FLEETGATE_TEST_PG_URL. Idempotent: a second
# run reuses the cluster, role and database.
#
#   export FLEETGATE_TEST_PG_URL="$(bash .ci/pg-setup.sh)"
#
# Progress goes to stderr; stdout carries the URL only.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
db=fleetgate_test
role=fleetgate
password=fleetgate-test

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  echo "pg-setup: installing postgresql" >&2
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi

version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
  echo "pg-setup: creating cluster $version/main" >&2
  pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
  echo "pg-setup: starting cluster $version/main" >&2
  pg_ctlcluster "$version" main start >&2
fi
port="$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')"

# Wait for it to accept connections (start returns before that on slow disks).
for _ in $(seq 1 50); do
  if su postgres -c "psql -p $port -qtAc 'SELECT 1'" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

psql_admin() { su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qtA $*"; }
if [ "$(psql_admin "-c \"SELECT 1 FROM pg_roles WHERE rolname = '$role'\"")" != 1 ]; then
  psql_admin "-c \"CREATE ROLE $role LOGIN PASSWORD '$password'\"" >&2
fi
if [ "$(psql_admin "-c \"SELECT 1 FROM pg_database WHERE datname = '$db'\"")" != 1 ]; then
  psql_admin "-c \"CREATE DATABASE $db OWNER $role\"" >&2
fi

echo "postgres://$role:$password@127.0.0.1:$port/$db"
