# System packages allot's scripts need, installed on demand. Sourced by
# scripts/test and scripts/serve (bash); defines functions only.
#
# ensure_build_deps: `protoc` (Debian's protobuf-compiler), which the build
#   script of etcd-client (the etcd store backend's gRPC client) runs.
# ensure_test_deps: what the store backends' tests start as throw-away
#   servers: PostgreSQL's server binaries and etcd (Debian's etcd-server).
#
# As root with apt-get, missing packages are installed (`apt-get update`
# once per run first); otherwise a missing build dependency is an error
# saying how to install it, and a missing test server a warning (the tests
# that need it fail, they never skip).

_allot_apt_updated=""

# Installs Debian packages when running as root with apt-get; returns 1
# (installing nothing) otherwise.
_allot_apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    return 1
  fi
  if [ -z "$_allot_apt_updated" ]; then
    apt-get update -qq
    _allot_apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

ensure_build_deps() {
  if command -v protoc >/dev/null; then
    return 0
  fi
  echo "==> installing protobuf-compiler (protoc, for the etcd client's build)" >&2
  if ! _allot_apt_install protobuf-compiler; then
    echo "error: protoc not found; the etcd store backend's build needs it:" \
      "install it with 'apt-get install protobuf-compiler' (Debian/Ubuntu)" \
      "or from your distribution's protobuf package, or set PROTOC to its path" >&2
    return 1
  fi
}

ensure_test_deps() {
  # The PostgreSQL store backend's tests start throw-away servers from the
  # installed binaries (and fail, never skip, without them).
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${ALLOT_PG_BIN:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing PostgreSQL (server binaries for the store tests)" >&2
      _allot_apt_install postgresql-15
    else
      echo "warning: PostgreSQL server binaries not found; the store tests will fail:" \
        "install them with 'apt-get install postgresql-15'" >&2
    fi
  fi
  # The etcd store backend's tests start throw-away etcd servers.
  if ! command -v etcd >/dev/null && [ -z "${ALLOT_ETCD_BIN:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing etcd (server binary for the store tests)" >&2
      _allot_apt_install etcd-server
      # The package may start a system service on the default ports; the
      # tests use their own ports, but a stray server helps nobody.
      if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
      fi
    else
      echo "warning: etcd not found; the etcd store tests will fail:" \
        "install it with 'apt-get install etcd-server'" >&2
    fi
  fi
}
