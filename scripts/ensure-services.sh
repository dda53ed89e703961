#!/usr/bin/env bash
# ensure-services.sh makes sure the services that tokend's tests talk to are
# running: PostgreSQL and Redis on this machine. For each one it
#   1. does nothing if it already answers;
#   2. starts it if it is installed but stopped;
#   3. installs it with apt-get if run as root on Debian (CI), then starts it;
#   4. otherwise fails, saying what is missing and how to get it.
# It is idempotent and prints one line per service on success. It also
# makes sure that Node.js and Chromium, which the browser client's tests run
# on, are installed, installing them the same way.
#
# The Go tests find the services through two variables, whose defaults match
# what this script provides (PostgreSQL with trust auth for 127.0.0.1):
#   TEST_DATABASE_URL         postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable
#                             (TOKEND_TEST_DATABASE_URL is read too)
#   TOKEND_TEST_REDIS_URL     redis://127.0.0.1:6379/0
# This script exports nothing. If you point those variables at other servers, set
# PG_HOST/PG_PORT and REDIS_HOST/REDIS_PORT to match; the script then only
# checks that they answer, and only starts or installs local servers.
#
# Sourcing this file defines need_pkg (and the other helpers) without doing
# anything, so that .ci/run can share them.

set -euo pipefail

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
READY_TIMEOUT=${READY_TIMEOUT:-30} # seconds to wait for a started service

die() {
	echo "ensure-services: $*" >&2
	exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [[ $(id -u) -eq 0 ]]; }

can_install() { is_root && have apt-get; }

is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == ::1 ]]; }

apt_updated=
# apt_install installs Debian packages, running apt-get update only when the
# install fails without it (a fresh machine's package lists may be empty or stale).
apt_install() {
	local install=(apt-get install -y -q --no-install-recommends "$@")
	export DEBIAN_FRONTEND=noninteractive
	if "${install[@]}" >/tmp/ensure-services-apt.log 2>&1; then
		return 0
	fi
	if [[ -z $apt_updated ]]; then
		apt-get update -q >>/tmp/ensure-services-apt.log 2>&1 || true
		apt_updated=1
		"${install[@]}" >>/tmp/ensure-services-apt.log 2>&1 && return 0
	fi
	tail -n 20 /tmp/ensure-services-apt.log >&2
	die "apt-get install $* failed (full log: /tmp/ensure-services-apt.log)"
}

# need_pkg CMD PKG makes sure command CMD exists, installing Debian package
# PKG when it does not and this machine allows it; otherwise it fails.
need_pkg() {
	local cmd=$1 pkg=$2
	have "$cmd" && return 0
	can_install || die "$cmd is missing; install it with: sudo apt-get install $pkg"
	apt_install "$pkg"
	have "$cmd" || die "installed $pkg but $cmd is still not on PATH"
	echo "$pkg: installed"
}

# wait_until CHECK... runs CHECK until it succeeds or READY_TIMEOUT passes.
wait_until() {
	local deadline=$((SECONDS + READY_TIMEOUT))
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

# tcp_open HOST PORT reports whether something accepts connections there.
tcp_open() {
	# shellcheck disable=SC2016 # $0 and $1 expand in the inner bash
	timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# --- PostgreSQL ---------------------------------------------------------------

pg_ready() {
	if have pg_isready; then
		pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2
	else
		tcp_open "$PG_HOST" "$PG_PORT"
	fi
}

# pg_installed reports whether a PostgreSQL server and Debian's cluster tools exist.
pg_installed() {
	have pg_ctlcluster && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# pg_trust_localhost lets every local TCP client in without a password, as the
# tests expect. Only used on a cluster this script has just installed or created.
pg_trust_localhost() {
	local hba=/etc/postgresql/$1/$2/pg_hba.conf marker='# added by tokend scripts/ensure-services.sh'
	[[ -f $hba ]] || die "PostgreSQL $1/$2: $hba not found"
	grep -qF "$marker" "$hba" && return 0
	# First match wins in pg_hba.conf, so these go on top. Rewriting the file
	# in place keeps its owner and mode.
	local rest
	rest=$(cat "$hba")
	printf '%s\n%s\n%s\n%s\n' "$marker" 'host all all 127.0.0.1/32 trust' 'host all all ::1/128 trust' "$rest" >"$hba"
}

# pg_start starts the cluster that uses PG_PORT (creating one, as root, when
# there is no cluster at all, as after installing the server by hand).
pg_start() {
	local ver='' name=''
	read -r ver name < <(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2 }' | sort -V | tail -n 1) || true
	if [[ -z $ver ]]; then
		[[ -z $(pg_lsclusters -h 2>/dev/null) ]] ||
			die "no PostgreSQL cluster uses port $PG_PORT; these exist:
$(pg_lsclusters)
  (set PG_PORT to one of their ports, or create one with: sudo pg_createcluster VERSION NAME --port $PG_PORT)"
		local bins=(/usr/lib/postgresql/*/bin/postgres)
		ver=$(printf '%s\n' "${bins[@]}" | cut -d/ -f5 | sort -V | tail -n 1)
		name=main
		is_root || die "PostgreSQL $ver is installed but has no cluster; create one with: sudo pg_createcluster $ver $name --port $PG_PORT"
		pg_createcluster "$ver" "$name" --port "$PG_PORT" >/dev/null
		pg_fresh=1
	fi
	if [[ -n ${pg_fresh:-} ]]; then
		pg_trust_localhost "$ver" "$name"
	fi
	local out
	if pg_lsclusters -h | awk -v v="$ver" -v n="$name" '$1 == v && $2 == n && $4 ~ /online/ { ok = 1 } END { exit !ok }'; then
		# Already running: the package's own start worked, or it is still
		# starting. A fresh one must re-read pg_hba.conf.
		if [[ -n ${pg_fresh:-} ]]; then
			out=$(pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload 2>&1) ||
				die "PostgreSQL $ver/$name: reload failed: $out"
		fi
	else
		out=$(pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>&1) ||
			die "PostgreSQL $ver/$name is installed but could not be started: $out
  (start it with: sudo pg_ctlcluster --skip-systemctl-redirect $ver $name start)"
	fi
}

# pg_test_db creates the database "test" if it is missing. It is skipped when
# TOKEND_TEST_DATABASE_URL is set: that database is the developer's business.
pg_test_db() {
	[[ -z ${TEST_DATABASE_URL:-}${TOKEND_TEST_DATABASE_URL:-} ]] || return 0
	have psql || die "psql is missing, so the database test cannot be checked; install it with: sudo apt-get install postgresql-client"
	local psql=(psql -X -w -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atc) out
	out=$(PGCONNECT_TIMEOUT=5 "${psql[@]}" "select 1 from pg_database where datname = 'test'" 2>&1) ||
		die "cannot connect to PostgreSQL at $PG_HOST:$PG_PORT as user postgres without a password: $out
  (the tests need trust auth for 127.0.0.1 in pg_hba.conf, or set TOKEND_TEST_DATABASE_URL)"
	[[ $out == 1 ]] && return 0
	out=$(PGCONNECT_TIMEOUT=5 "${psql[@]}" 'create database test' 2>&1) ||
		die "cannot create database test: $out"
}

ensure_postgres() {
	local how=running
	if ! pg_ready; then
		is_local "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT does not answer (it is not local, so it is not started here)"
		if ! pg_installed; then
			can_install || die "PostgreSQL is not running on $PG_HOST:$PG_PORT and not installed; install it with: sudo apt-get install postgresql"
			apt_install postgresql
			pg_installed || die "installed postgresql but found no server in /usr/lib/postgresql"
			pg_fresh=1
			how=installed
		else
			how=started
		fi
		pg_start
		wait_until pg_ready ||
			die "PostgreSQL did not answer on $PG_HOST:$PG_PORT within ${READY_TIMEOUT}s (see pg_lsclusters and /var/log/postgresql/)"
	fi
	pg_test_db
	echo "postgresql: $how on $PG_HOST:$PG_PORT"
}

# --- Redis --------------------------------------------------------------------

redis_ready() {
	if have redis-cli; then
		[[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
	else
		# shellcheck disable=SC2016 # the inner bash expands these
		timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "PING\r\n" >&3 && read -r reply <&3 && [[ $reply == +PONG* ]]' \
			"$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
	fi
}

redis_start() {
	local dir=/var/lib/redis logdir=/var/log/redis
	if is_root; then
		mkdir -p "$dir" "$logdir"
	elif [[ ! -w $dir || ! -w $logdir ]]; then
		# Not root (a developer's machine): keep Redis's files somewhere writable.
		dir=${TMPDIR:-/tmp}/tokend-redis-$(id -u)
		logdir=$dir
		mkdir -p "$dir"
	fi
	local log=$logdir/ci.log
	[[ $REDIS_PORT == 6379 ]] || log=$logdir/ci-$REDIS_PORT.log
	local out
	out=$(redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
		--dir "$dir" --logfile "$log" 2>&1) ||
		die "Redis is installed but could not be started: $out"
	REDIS_LOG=$log
}

ensure_redis() {
	local how=running
	if ! redis_ready; then
		is_local "$REDIS_HOST" || die "Redis at $REDIS_HOST:$REDIS_PORT does not answer (it is not local, so it is not started here)"
		if ! have redis-server; then
			can_install || die "Redis is not running on $REDIS_HOST:$REDIS_PORT and not installed; install it with: sudo apt-get install redis-server"
			apt_install redis-server
			have redis-server || die "installed redis-server but redis-server is still not on PATH"
			how=installed
		else
			how=started
		fi
		# The package may have started its own server; start ours only if not.
		redis_ready || redis_start
		wait_until redis_ready || die "Redis did not answer on $REDIS_HOST:$REDIS_PORT within ${READY_TIMEOUT}s (see ${REDIS_LOG:-its log})"
	fi
	echo "redis: $how on $REDIS_HOST:$REDIS_PORT"
}

# --- Chromium and Node.js ------------------------------------------------------

# ensure_browser_tools provides what the browser client's tests run on: node
# runs client/test/, and the Go browser tests (cmd/tokend) drive Chromium,
# which they find as chromium, chromium-browser or google-chrome, or at
# TOKEND_TEST_CHROMIUM.
ensure_browser_tools() {
	need_pkg node nodejs
	echo "nodejs: $(node --version)"
	if [[ -n ${TOKEND_TEST_CHROMIUM:-} ]]; then
		[[ -x $TOKEND_TEST_CHROMIUM ]] || die "TOKEND_TEST_CHROMIUM=$TOKEND_TEST_CHROMIUM is not an executable"
	elif ! have chromium && ! have chromium-browser && ! have google-chrome; then
		need_pkg chromium chromium
	fi
	echo "chromium: found"
}

main() {
	have go || die "go is not on PATH; install Go 1.26 (https://go.dev/dl/) or add /usr/local/go/bin to PATH"
	ensure_postgres
	ensure_redis
	ensure_browser_tools
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	main "$@"
fi
