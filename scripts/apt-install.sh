# Sourced by the install scripts: `apt_install <who> <package>...` installs the packages with
# apt-get when run as root; without root it says what is missing and returns <status>
# (MISSING_STATUS, default 0: the caller goes on and whatever needs them skips or fails).
apt_install() {
  local who=$1
  shift
  [ $# -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "$who: missing $*; run this script as root (or apt-get install them)" >&2
    return "${MISSING_STATUS:-0}"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  echo "$who: installed $*"
}
