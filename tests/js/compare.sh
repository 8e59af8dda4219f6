#!/usr/bin/env bash
# Side by side: the same workload of stock automerge-repo 2.x clients (compare.mjs) against
# `relais serve` and against the reference @automerge/automerge-repo-sync-server, in one
# run, on this machine, one server at a time. Prints changes per second, the time for a
# fresh client to fetch every document, and each server's peak RSS and CPU time, with the
# ratios (relais advantage: above 1 means relais did better).
#
# Env: WRITERS (10), DOCS (1000), CHANGES (10), RELAIS_BIN (default: build it with cargo),
#      OUT (optional file for a JSON object with both results and the ratios),
#      TIMEOUT_SCALE (multiplies compare.mjs's phase timeouts, default 1).
# Example: WRITERS=2 DOCS=50 CHANGES=3 RELAIS_BIN=target/release/relais tests/js/compare.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export WRITERS="${WRITERS:-10}" DOCS="${DOCS:-1000}" CHANGES="${CHANGES:-10}"
export TIMEOUT_SCALE="${TIMEOUT_SCALE:-1}"

if [ -z "${RELAIS_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -p relais-server)
  RELAIS_BIN="$ROOT/target/release/relais"
fi
# Resolve before cd: a relative RELAIS_BIN is meant from the caller's directory.
RELAIS_BIN="$(cd "$(dirname "$RELAIS_BIN")" && pwd)/$(basename "$RELAIS_BIN")"
[ -x "$RELAIS_BIN" ] || { echo "no relais binary at $RELAIS_BIN" >&2; exit 1; }
if [ -n "${OUT:-}" ]; then OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"; fi

cd "$HERE"
if [ ! -d node_modules/@automerge/automerge-repo-sync-server ]; then
  npm install --no-audit --no-fund --loglevel=error
fi

TMP="$(mktemp -d)"
RELAIS_PID=""
REF_PID=""
cleanup() {
  for p in $RELAIS_PID $REF_PID; do kill "$p" 2>/dev/null || true; done
  for p in $RELAIS_PID $REF_PID; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# Peak resident set (kB) and CPU seconds (user + system) of a live process.
peak_rss_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
cpu_seconds() {
  # Fields after the ")" that closes the command name: utime and stime are the 12th and 13th.
  local ticks
  ticks="$(sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }')"
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}

# Stops a server and adds its peak RSS and CPU time, read just before, to its result.
stop_and_measure() { # pid label result-file
  local pid="$1" label="$2" file="$3" rss cpu
  rss="$(peak_rss_kb "$pid")"
  cpu="$(cpu_seconds "$pid")"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  node -e '
    const fs = require("fs")
    const r = JSON.parse(fs.readFileSync(process.argv[1], "utf8"))
    r.server_peak_rss_kb = Number(process.argv[2])
    r.server_cpu_seconds = Number(process.argv[3])
    fs.writeFileSync(process.argv[1], JSON.stringify(r))
  ' "$file" "$rss" "$cpu"
  echo "$label: peak RSS ${rss} kB, CPU ${cpu} s" >&2
}

# Runs the workload; its result is the last stdout line. A failed run is recorded as
# {"failed": "<the FAIL line>"} so that the other server still runs and the table says why.
FAILED=0
run_workload() { # label url result-file server-log
  local label="$1" url="$2" file="$3" log="$4"
  if SERVER_LABEL="$label" node compare.mjs "$url" >"$file.out" 2> >(tee "$file.err" >&2); then
    tail -n 1 "$file.out" >"$file"
  else
    FAILED=1
    echo "the workload failed against $label; last lines of its server log ($log):" >&2
    tail -n 30 "$log" >&2 || true
    sleep 0.2 # let tee finish writing the client's stderr
    node -e '
      const fs = require("fs")
      const err = fs.readFileSync(process.argv[2], "utf8").split("\n").filter((l) => l.startsWith("FAIL")).pop()
      fs.writeFileSync(process.argv[1], JSON.stringify({ server_label: process.argv[3], failed: err || "compare.mjs exited non-zero" }))
    ' "$file" "$file.err" "$label"
  fi
}

# ---- relais
RELAIS_DATA="$TMP/relais"
mkdir -p "$RELAIS_DATA"
# The token is printed once, on the last line of stdout.
TOKEN="$(RELAIS_LOG=warn "$RELAIS_BIN" token create --data "$RELAIS_DATA" --name bench --role admin | tail -n 1)"
[ -n "$TOKEN" ] || { echo "relais token create printed no token" >&2; exit 1; }
RELAIS_LOG=warn "$RELAIS_BIN" serve --data "$RELAIS_DATA" --listen 127.0.0.1:0 \
  >"$TMP/relais.out" 2>"$TMP/relais.err" &
RELAIS_PID=$!
ADDR=""
for _ in $(seq 1 100); do
  ADDR="$(head -n 1 "$TMP/relais.out" 2>/dev/null | sed -n 's#.*://\([0-9.]*:[0-9]*\).*#\1#p')"
  [ -n "$ADDR" ] && break
  kill -0 "$RELAIS_PID" 2>/dev/null || { cat "$TMP/relais.err" >&2; echo "relais serve exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "relais serve printed no address" >&2; cat "$TMP/relais.err" >&2; exit 1; }
echo "relais serve on $ADDR (pid $RELAIS_PID)" >&2
run_workload relais "ws://$ADDR/sync?token=$TOKEN" "$TMP/relais.json" "$TMP/relais.err"
stop_and_measure "$RELAIS_PID" relais "$TMP/relais.json"
RELAIS_PID=""

# ---- reference sync server
PORT="$(node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })')"
mkdir -p "$TMP/ref"
# Its Server calls app.listen(PORT), which binds every interface; pin it to loopback by
# giving net.Server.listen a host when only a port is passed. Nothing else changes.
PORT="$PORT" DATA_DIR="$TMP/ref" node --input-type=module -e '
  import net from "node:net"
  const listen = net.Server.prototype.listen
  net.Server.prototype.listen = function (port, ...rest) {
    if (typeof port === "number" || (typeof port === "string" && /^\d+$/.test(port)))
      return listen.call(this, Number(port), "127.0.0.1", ...rest)
    return listen.call(this, port, ...rest)
  }
  await import("./node_modules/@automerge/automerge-repo-sync-server/src/index.js")
' >"$TMP/ref.log" 2>&1 &
REF_PID=$!
for _ in $(seq 1 100); do
  grep -q "Listening on port" "$TMP/ref.log" 2>/dev/null && break
  kill -0 "$REF_PID" 2>/dev/null || { cat "$TMP/ref.log" >&2; echo "the reference server exited" >&2; exit 1; }
  sleep 0.1
done
grep -q "Listening on port" "$TMP/ref.log" || { cat "$TMP/ref.log" >&2; echo "the reference server did not start" >&2; exit 1; }
echo "reference sync server on 127.0.0.1:$PORT (pid $REF_PID)" >&2
run_workload reference "ws://127.0.0.1:$PORT/" "$TMP/ref.json" "$TMP/ref.log"
stop_and_measure "$REF_PID" reference "$TMP/ref.json"
REF_PID=""

# ---- the table, and OUT
MEM="$(free -g | awk '/^Mem:/ { print $2 " GiB total, " $7 " GiB available" }')"
RELAIS_VERSION="$("$RELAIS_BIN" --version 2>/dev/null || echo unknown)"
node -e '
  const fs = require("fs")
  const [relaisFile, refFile, out, date, nproc, mem, relaisVersion] = process.argv.slice(1)
  const relais = JSON.parse(fs.readFileSync(relaisFile, "utf8"))
  const reference = JSON.parse(fs.readFileSync(refFile, "utf8"))
  // Each ratio reads "how many times better relais did": higher is better for relais.
  // A measure a failed run did not produce is null (and "-" in the table).
  // If either run failed the two did not do the same work, so no ratio is given at all.
  const bothRan = !relais.failed && !reference.failed
  const ratio = (num, den) => (bothRan && Number.isFinite(num) && Number.isFinite(den) && den > 0 ? num / den : null)
  const ratios = {
    changes_per_second: ratio(relais.changes_per_second, reference.changes_per_second),
    fresh_fetch: ratio(reference.fresh_fetch_seconds, relais.fresh_fetch_seconds),
    create: ratio(reference.create_seconds, relais.create_seconds),
    server_peak_rss: ratio(reference.server_peak_rss_kb, relais.server_peak_rss_kb),
    server_cpu: ratio(reference.server_cpu_seconds, relais.server_cpu_seconds),
  }
  const fmt = (x, digits, scale = 1) => (Number.isFinite(x) ? (x / scale).toFixed(digits) : "-")
  const rows = [
    ["changes per second", fmt(relais.changes_per_second, 0), fmt(reference.changes_per_second, 0), ratios.changes_per_second],
    [`fresh client fetches ${process.env.DOCS} docs (s)`, fmt(relais.fresh_fetch_seconds, 2), fmt(reference.fresh_fetch_seconds, 2), ratios.fresh_fetch],
    ["create + observer has them (s)", fmt(relais.create_seconds, 2), fmt(reference.create_seconds, 2), ratios.create],
    ["server peak RSS (MB)", fmt(relais.server_peak_rss_kb, 1, 1024), fmt(reference.server_peak_rss_kb, 1, 1024), ratios.server_peak_rss],
    ["server CPU time (s)", fmt(relais.server_cpu_seconds, 2), fmt(reference.server_cpu_seconds, 2), ratios.server_cpu],
    ["connections the server dropped", fmt(relais.client_disconnects, 0), fmt(reference.client_disconnects, 0), null],
  ]
  const params = `writers ${process.env.WRITERS}, documents ${process.env.DOCS}, changes per document ${process.env.CHANGES}`
  console.log(`date: ${date}`)
  console.log(`machine: ${nproc} cores, memory ${mem}`)
  // The sync server brings its own automerge-repo (1.x), nested under its node_modules.
  const version = (...paths) => {
    for (const p of paths) try { return JSON.parse(fs.readFileSync(p + "/package.json", "utf8")).version } catch (e) {}
    return "?"
  }
  const nm = "node_modules/@automerge/"
  const server = nm + "automerge-repo-sync-server"
  const versions = {
    relais: relaisVersion,
    reference_sync_server: version(server),
    reference_automerge_repo: version(server + "/" + nm + "automerge-repo", nm + "automerge-repo"),
    client_automerge_repo: version(nm + "automerge-repo"),
  }
  console.log(`relais: ${versions.relais}; reference: @automerge/automerge-repo-sync-server ${versions.reference_sync_server} ` +
    `(on automerge-repo ${versions.reference_automerge_repo}); clients: @automerge/automerge-repo ${versions.client_automerge_repo}`)
  console.log(`parameters: ${params}`)
  console.log("")
  console.log("| measure | relais | reference | ratio (relais advantage) |")
  console.log("| --- | --- | --- | --- |")
  for (const [m, a, b, r] of rows) console.log(`| ${m} | ${a} | ${b} | ${r === null ? "-" : r.toFixed(2) + "x"} |`)
  for (const r of [relais, reference]) if (r.failed) console.log(`\n${r.server_label} FAILED: ${r.failed}`)
  if (out) {
    const parameters = { writers: Number(process.env.WRITERS), documents: Number(process.env.DOCS), changes_per_doc: Number(process.env.CHANGES) }
    fs.writeFileSync(out, JSON.stringify({ date, nproc: Number(nproc), memory: mem, versions, parameters, relais, reference, ratios }, null, 2) + "\n")
    console.log(`\nwrote ${out}`)
  }
' "$TMP/relais.json" "$TMP/ref.json" "${OUT:-}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$MEM" "$RELAIS_VERSION"
exit "$FAILED"
