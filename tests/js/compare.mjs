// One workload of stock automerge-repo 2.x clients against one sync server, so that
// `relais serve` and the reference @automerge/automerge-repo-sync-server can be measured
// the same way, one after the other (compare.sh runs both and prints the ratios).
//
// Usage: node compare.mjs [URL]
// Env:   SERVER_URL     ws://... of the server (or the first argument)
//        SERVER_LABEL   name printed in the result (default "server")
//        WRITERS        writer clients W (default 10)
//        DOCS           documents D in total (default 1000), spread over the writers
//        CHANGES        small changes per document C (default 10)
//        TIMEOUT_SCALE  multiplies every phase timeout (default 1)
//
// Phases: "create" (writers register D households; an observer finds them all), "changes"
// (writers make C edits per document; the observer waits until it has them all) and "fresh
// fetch" (a new client with nothing finds every document). Prints one JSON line on stdout;
// progress goes to stderr. Exits non-zero, saying which phase failed and how many documents
// were stuck, on a timeout, a crash or a mismatch.
//
// Every client (each writer, the observer, the fresh client) runs in its own node process,
// as it would on its own tablet. In one process they share one JS heap and one Automerge
// wasm heap, and with 1,000 documents that process spends most of its time in garbage
// collection: a fresh fetch of 1,000 documents that takes 8 s in its own process took
// 35-63 s there, against either server, which measured the client rather than the server.
import { fork } from "node:child_process"
import { createHash } from "node:crypto"
import { fileURLToPath } from "node:url"
import { NetworkAdapter, Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const role = process.env.COMPARE_ROLE // unset: this is the coordinator
const children = [] // the coordinator's client processes, killed if it fails
const url = process.env.COMPARE_URL || process.argv[2] || process.env.SERVER_URL
const label = process.env.SERVER_LABEL || "server"
const W = intEnv("WRITERS", 10)
const D = intEnv("DOCS", 1000)
const C = intEnv("CHANGES", 10)
const timeoutScale = Number(process.env.TIMEOUT_SCALE || "1")
if (!url) fail("no server URL: pass it as the first argument or SERVER_URL")
if (D < W) fail(`DOCS (${D}) must be at least WRITERS (${W})`)

// Phase budgets grow with the work so that a large run is not cut short, yet a server
// that stops answering fails the run in bounded time instead of hanging it.
const budget = {
  connect: 30_000 * timeoutScale,
  create: (60 + D * 0.1) * 1000 * timeoutScale,
  changes: (60 + D * C * 0.02) * 1000 * timeoutScale,
  fetch: (60 + D * 0.1) * 1000 * timeoutScale,
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const now = () => performance.now()
const log = (msg) => console.error(`[${label}${role ? " " + role : ""}] ${msg}`)

function intEnv(name, dflt) {
  const v = process.env[name]
  if (v === undefined || v === "") return dflt
  const n = Number(v)
  if (!Number.isInteger(n) || n <= 0) fail(`${name} must be a positive integer, got ${v}`)
  return n
}

function fail(msg) {
  console.error(`FAIL [${label}${role ? " " + role : ""}]: ${msg}`)
  for (const c of children) c.kill()
  process.exit(1)
}

async function withTimeout(promise, ms, what) {
  let timer
  const t = new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`timed out after ${Math.round(ms)} ms: ${what}`)), ms) })
  try {
    return await Promise.race([promise, t])
  } finally {
    clearTimeout(timer)
  }
}

// A household registration as a field tablet would write it (~400 bytes of JSON).
const GIVEN = ["Aminata", "Moussa", "Fatoumata", "Ibrahim", "Mariam", "Oumar", "Kadiatou", "Seydou"]
const FAMILY = ["Traoré", "Coulibaly", "Diarra", "Keïta", "Sangaré", "Diallo", "Touré", "Konaté"]
function household(i) {
  return {
    kind: "household",
    site: `SOC-${String(1 + (i % 20)).padStart(2, "0")}`,
    registration_no: `HH-${String(i).padStart(6, "0")}`,
    head: { given: GIVEN[i % GIVEN.length], family: FAMILY[(i * 7) % FAMILY.length], phone: `+223 7${String(1000000 + i).slice(-7)}` },
    registered_at: new Date(Date.UTC(2026, 10, 1) + i * 60_000).toISOString(),
    registered_by: `enumerator-${i % 37}`,
    village: `Village ${i % 113}`,
    members: [
      { sex: "F", age: 20 + (i % 30) },
      { sex: "M", age: 25 + (i % 35) },
      { sex: i % 2 ? "F" : "M", age: i % 15 },
      { sex: i % 3 ? "M" : "F", age: i % 9 },
    ],
    vulnerabilities: ["female_headed", "children_under_5"].slice(0, 1 + (i % 2)),
    distributions: {},
    status: "active",
  }
}

// Heads are a set; compare them independent of order. null while the handle is not ready.
function headsKey(handle) {
  try {
    return JSON.stringify([...handle.heads()].sort())
  } catch (e) {
    return null
  }
}

// Document content as canonical JSON: a document built by local edits lists a key added
// later in insertion order, one loaded from a sync in sorted order, though both are equal.
function canonical(v) {
  return JSON.stringify(v, (_, x) =>
    x && typeof x === "object" && !Array.isArray(x)
      ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, x[k]]))
      : x)
}
const digest = (handle) => createHash("sha256").update(canonical(handle.doc())).digest("hex")

// One end of an in-memory link between two Repos in this process (for the warm-up).
class Pipe extends NetworkAdapter {
  other = null
  isReady() { return this.peerId !== undefined }
  whenReady() { return Promise.resolve() }
  connect(peerId, peerMetadata) {
    this.peerId = peerId
    this.peerMetadata = peerMetadata
    this.emit("ready", { network: this })
    if (this.other.isReady()) {
      this.emit("peer-candidate", { peerId: this.other.peerId, peerMetadata: this.other.peerMetadata })
      this.other.emit("peer-candidate", { peerId, peerMetadata })
    }
  }
  send(message) { setImmediate(() => this.other.emit("message", message)) }
  disconnect() {}
}

// A new node process spends its first second or so compiling the Automerge wasm module and
// JIT-compiling automerge-repo; timed, that would add the same constant to every phase
// whichever the server. So each client first syncs a few households between two local
// Repos, which runs the same code paths (create, change, sync messages, find) off the clock.
async function warmUp() {
  const a = new Pipe(), b = new Pipe()
  a.other = b
  b.other = a
  const ra = new Repo({ network: [a] }), rb = new Repo({ network: [b] })
  const made = Array.from({ length: 30 }, (_, i) => ra.create(household(i)))
  for (let c = 0; c < 3; c++) for (const h of made) h.change((d) => { d.distributions[`r${c}`] = { kg: 25 } })
  const found = await Promise.all(made.map((h) => rb.find(h.url)))
  for (let k = 0; k < 200 && found.some((h, i) => headsKey(h) !== headsKey(made[i])); k++) await sleep(20)
  digest(found[0])
  await Promise.race([Promise.allSettled([ra.shutdown(), rb.shutdown()]), sleep(2000)])
}

// ---------------------------------------------------------------------------------------
// A client process: one Repo with its own WebSocket, driven by the coordinator over IPC.
// ---------------------------------------------------------------------------------------
async function client() {
  // No storage: the client is a fresh, in-memory peer that can only learn documents
  // through the server, so everything measured crosses the server.
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)] })
  const handles = [] // in the order the coordinator gave (created or asked for)

  // What the server sent this client (the messages' payload bytes), to tell a server that
  // is slow from one that makes its clients work harder.
  const received = { messages: 0, bytes: 0 }
  repo.networkSubsystem.on("message", (m) => {
    received.messages++
    received.bytes += m.data ? m.data.byteLength : 0
  })

  // A server may drop a client's connection (the reference server terminates any socket
  // that has not answered its keep-alive ping by the next one, 5 s later); automerge-repo
  // reconnects by itself, but a result or a failure that follows one should say so.
  let disconnects = 0
  let closing = false
  repo.networkSubsystem.on("peer-disconnected", () => {
    if (closing) return
    disconnects++
    log("lost the connection to the server (automerge-repo reconnects)")
  })

  // Runs fn over items with at most `limit` in flight: a client asking for every document
  // at once would measure its own queueing more than the server.
  async function pool(items, limit, fn) {
    let next = 0
    const worker = async () => {
      while (next < items.length) {
        const i = next++
        await fn(items[i], i)
      }
    }
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  }

  // Resolves once every handle has the expected heads. A handle is rechecked when its heads
  // change, and all pending ones every 250 ms (a handle that turns ready emits its change
  // before it is ready, so the event alone can miss it); no cost for those already done.
  function waitHeads(phase, expected, ms) {
    return new Promise((resolve, reject) => {
      const pending = new Set(expected.keys())
      const listeners = new Map()
      const finish = (err) => {
        clearInterval(sweep)
        clearTimeout(timer)
        for (const [i, f] of listeners) handles[i].off("heads-changed", f)
        err ? reject(err) : resolve()
      }
      const check = (i) => {
        if (pending.has(i) && headsKey(handles[i]) === expected[i]) {
          pending.delete(i)
          if (pending.size === 0) finish()
        }
      }
      for (const i of pending) {
        const f = () => check(i)
        listeners.set(i, f)
        handles[i].on("heads-changed", f)
      }
      const sweep = setInterval(() => { for (const i of pending) check(i) }, 250)
      const timer = setTimeout(() => {
        const stuck = [...pending]
        const states = {}
        for (const i of stuck) states[handles[i].state] = (states[handles[i].state] || 0) + 1
        const sample = stuck.slice(0, 3).map((i) => `${handles[i].url} (state ${handles[i].state}, visits ${visits(handles[i])}, heads ${headsKey(handles[i])}, want ${expected[i]})`)
        const err = new Error(`phase ${phase}: ${stuck.length} of ${expected.length} documents never reached the writer's heads within ${Math.round(ms)} ms; their states ${JSON.stringify(states)}; e.g. ${sample.join("; ")}`)
        err.stuck = stuck
        finish(err)
      }, ms)
      for (const i of [...pending]) check(i)
      if (expected.length === 0) finish()
    })
  }

  // Which round of changes a document shows (the writers count them in `visits`).
  const visits = (h) => { try { return h.doc().visits ?? 0 } catch (e) { return "?" } }

  const commands = {
    // A writer registers its share of the households.
    create({ indices }) {
      for (const i of indices) handles.push(repo.create(household(i)))
      return { urls: handles.map((h) => h.url), heads: handles.map(headsKey) }
    },
    // A writer makes `rounds` small edits to each of its documents, as fast as it can.
    async change({ rounds }) {
      for (let c = 0; c < rounds; c++) {
        for (const h of handles) {
          h.change((d) => {
            d.visits = c + 1
            d.distributions[`round-${c + 1}`] = { item: c % 2 ? "oil" : "maize", kg: 25, at: new Date(Date.UTC(2026, 11, 1, 8, c)).toISOString() }
          })
        }
        // Let the socket carry this round before the next: without it all the rounds would
        // be made in one tick and reach the network as one merged sync per document.
        await new Promise((r) => setImmediate(r))
      }
      return { heads: handles.map(headsKey) }
    },
    // The observer or the fresh client asks for every document and waits for the heads.
    async find({ phase, urls, heads, concurrency, ms }) {
      const start = now()
      const cpu0 = process.cpuUsage()
      const got0 = { ...received }
      let unavailable = 0
      await withTimeout(
        pool(urls, concurrency, async (u, i) => {
          // A server answers "unavailable" when the observer asks before the writer's first
          // sync reached it. Keep the handle: the server keeps the asker among the
          // document's peers and sends it the document once it has it, and the handle then
          // turns ready by itself, which waitHeads waits for. (Asking again would need
          // Repo.delete, which rejects promises inside automerge-repo that nobody catches.)
          const h = await repo.find(u, { allowableStates: ["ready", "unavailable"] })
          if (h.state === "unavailable") unavailable++
          handles[i] = h
        }),
        ms,
        `${urls.length} finds (${handles.filter(Boolean).length} answered)`,
      )
      const foundSeconds = (now() - start) / 1000
      await waitHeads(phase, heads, Math.max(1000, ms - (now() - start)))
      const cpu = process.cpuUsage(cpu0)
      return {
        unavailable,
        foundSeconds,
        cpuSeconds: (cpu.user + cpu.system) / 1e6,
        messages: received.messages - got0.messages,
        bytes: received.bytes - got0.bytes,
      }
    },
    // The observer waits until its documents have the writers' final heads.
    async wait({ phase, heads, ms }) {
      await waitHeads(phase, heads, ms)
      return {}
    },
    // For a diagnosis: does the server hand a new client the expected heads?
    async check({ urls, heads, ms }) {
      const hs = await Promise.all(urls.map((u) => repo.find(u, { allowableStates: ["ready", "unavailable"] }).catch(() => null)))
      const end = now() + Math.min(ms, 10_000)
      while (now() < end && hs.some((h, i) => h && headsKey(h) !== heads[i])) await sleep(100)
      const r = { current: 0, behind: 0, missing: 0 }
      hs.forEach((h, i) => { r[!h || h.state !== "ready" ? "missing" : headsKey(h) === heads[i] ? "current" : "behind"]++ })
      return r
    },
    digests() {
      return handles.map(digest)
    },
    stats() {
      return { disconnects }
    },
    async exit() {
      closing = true
      // shutdown() can wait on sockets that a slow server keeps open; the work is done.
      await Promise.race([repo.shutdown().catch(() => {}), sleep(3000)])
      process.exit(0)
    },
  }

  // The callback keeps a send to a coordinator that already exited from throwing EPIPE.
  const reply = (m) => { if (process.connected) process.send(m, () => {}) }
  process.on("message", async (m) => {
    try {
      reply({ id: m.id, ok: true, result: await commands[m.cmd](m) })
    } catch (e) {
      reply({ id: m.id, ok: false, error: String(e && e.message ? e.message : e), stuck: e && e.stuck })
    }
  })
  // The coordinator went away (it failed or was killed): there is nothing left to do.
  process.on("disconnect", () => process.exit(1))
  try {
    await warmUp()
    // The adapter calls itself ready after 1 s even with no connection, so wait for the
    // server to have answered the join as a peer.
    await withTimeout((async () => {
      await repo.networkSubsystem.whenReady()
      while (repo.peers.length === 0) await sleep(20)
    })(), budget.connect, `connecting to ${url.replace(/token=[^&]*/, "token=…")}`)
  } catch (e) {
    fail(String(e.message))
  }
  reply({ type: "ready" })
}

// ---------------------------------------------------------------------------------------
// The coordinator: starts the clients, runs the phases, measures, checks, reports.
// ---------------------------------------------------------------------------------------
async function coordinator() {
  const self = fileURLToPath(import.meta.url)
  let closing = false
  let nextId = 1

  function start(name) {
    const child = fork(self, [], {
      env: { ...process.env, COMPARE_ROLE: name, COMPARE_URL: url },
      // The result line is the coordinator's alone: children print to stderr only.
      stdio: ["ignore", 2, 2, "ipc"],
    })
    const waiting = new Map()
    child.on("message", (m) => {
      if (m.type === "ready") return child.emit("ready")
      const w = waiting.get(m.id)
      if (!w) return
      waiting.delete(m.id)
      if (m.ok) return w.resolve(m.result)
      const err = new Error(`${name}: ${m.error}`)
      err.stuck = m.stuck
      w.reject(err)
    })
    child.on("exit", (code, signal) => {
      if (!closing) fail(`client ${name} exited (code ${code}, signal ${signal}) before the run ended; its stderr is above`)
    })
    child.call = (cmd, args = {}, ms = 30_000) => {
      const id = nextId++
      const p = new Promise((resolve, reject) => waiting.set(id, { resolve, reject }))
      child.send({ id, cmd, ...args })
      // The child enforces the phase budget itself and says what was stuck; this only
      // catches a child that stopped answering altogether.
      return withTimeout(p, ms + 30_000, `client ${name} did not answer ${cmd}`)
    }
    children.push(child)
    return withTimeout(new Promise((r) => child.once("ready", () => r(child))), budget.connect + 10_000, `client ${name} connecting to ${url}`)
  }

  async function compareDigests(phase, a, b, who) {
    for (let i = 0; i < D; i++) {
      if (a[i] !== b[i]) throw new Error(`phase ${phase}: document ${i} (${urls[i]}) reads differently at the ${who} than at its writer`)
    }
  }

  // Connections the server dropped, over all clients so far.
  async function disconnects() {
    const all = await Promise.all(children.map((c) => c.call("stats", {}, 10_000).catch(() => ({ disconnects: 0 }))))
    return all.reduce((n, r) => n + r.disconnects, 0)
  }

  // The observer missed some edits: ask a new client whether the server has them, so the
  // report says whether the server lost the edits or only failed to pass them on.
  async function diagnose(e, expected) {
    try {
      log(`diagnosis: the server dropped ${await disconnects()} client connections during the run`)
      const probe = await start("probe")
      const stuck = e.stuck
      const r = await probe.call("check", { urls: stuck.map((i) => urls[i]), heads: stuck.map((i) => expected[i]), ms: 30_000 }, 30_000)
      log(`diagnosis: of the ${stuck.length} documents the observer is missing edits of, a new client reading from the server found ${r.current} with the writer's final heads, ${r.behind} with older heads, ${r.missing} not at all`)
    } catch (err) {
      log(`diagnosis failed: ${err.message}`)
    }
  }

  // Writer w registers the households i with i % W == w.
  const shares = Array.from({ length: W }, (_, w) => Array.from({ length: D }, (_, i) => i).filter((i) => i % W === w))
  const urls = new Array(D)
  const positions = shares.map(() => [])

  // Every client connects before any clock starts.
  const writers = await Promise.all(shares.map((_, w) => start(`writer-${w}`)))
  const observer = await start("observer")
  log(`${W} writers and an observer connected to ${url.replace(/token=[^&]*/, "token=…")}`)

  // ---- phase "create"
  let t = now()
  const created = await Promise.all(writers.map((c, w) => c.call("create", { indices: shares[w] })))
  const createHeads = new Array(D)
  created.forEach((r, w) => shares[w].forEach((i, k) => { urls[i] = r.urls[k]; createHeads[i] = r.heads[k]; positions[w].push(i) }))
  const seen = await observer.call("find", { phase: "create", urls, heads: createHeads, concurrency: 50, ms: budget.create }, budget.create)
  const createSeconds = (now() - t) / 1000
  log(`create: ${D} documents in ${createSeconds.toFixed(2)} s (observer found all after ${seen.foundSeconds.toFixed(2)} s; ${seen.unavailable} answered unavailable at first)`)

  // ---- phase "changes"
  t = now()
  const changed = await Promise.all(writers.map((c) => c.call("change", { rounds: C }, budget.changes)))
  const finalHeads = new Array(D)
  changed.forEach((r, w) => positions[w].forEach((i, k) => { finalHeads[i] = r.heads[k] }))
  try {
    await observer.call("wait", { phase: "changes", heads: finalHeads, ms: budget.changes }, budget.changes)
  } catch (e) {
    if (e.stuck) await diagnose(e, finalHeads)
    throw e
  }
  const changesSeconds = (now() - t) / 1000
  const changesPerSecond = (D * C) / changesSeconds
  log(`changes: ${D * C} changes in ${changesSeconds.toFixed(2)} s = ${changesPerSecond.toFixed(0)}/s`)

  // The observer must read what the writers wrote, not only have the same heads.
  const writerDigests = new Array(D)
  const wd = await Promise.all(writers.map((c) => c.call("digests")))
  wd.forEach((r, w) => positions[w].forEach((i, k) => { writerDigests[i] = r[k] }))
  await compareDigests("changes", writerDigests, await observer.call("digests"), "observer")

  // ---- phase "fresh fetch": a new client with nothing asks for every document
  const fresh = await start("fresh")
  t = now()
  const fetched = await fresh.call("find", { phase: "fresh fetch", urls, heads: finalHeads, concurrency: 100, ms: budget.fetch }, budget.fetch)
  const fetchSeconds = (now() - t) / 1000
  log(`fresh fetch: ${D} documents in ${fetchSeconds.toFixed(2)} s (found all after ${fetched.foundSeconds.toFixed(2)} s; ${fetched.unavailable} answered unavailable; the client received ${fetched.messages} messages, ${fetched.bytes} bytes, and used ${fetched.cpuSeconds.toFixed(2)} s of CPU)`)
  await compareDigests("fresh fetch", writerDigests, await fresh.call("digests"), "fresh client")

  const dropped = await disconnects()

  // Let each client close its Repo; one that takes longer than 5 s is killed below.
  closing = true
  const exited = children.map((c) => new Promise((r) => c.once("exit", r)))
  for (const c of children) c.send({ id: 0, cmd: "exit" })
  await Promise.race([Promise.all(exited), sleep(5000)])

  const round = (x, n = 3) => Number(x.toFixed(n))
  console.log(JSON.stringify({
    server_label: label,
    writers: W,
    documents: D,
    changes_per_doc: C,
    create_seconds: round(createSeconds),
    changes_seconds: round(changesSeconds),
    changes_per_second: round(changesPerSecond, 1),
    fresh_fetch_seconds: round(fetchSeconds),
    // A server that does not have a document yet answers "unavailable"; during the fresh
    // fetch it has them all, so any count there is worth a look.
    create_unavailable_answers: seen.unavailable,
    fetch_unavailable_answers: fetched.unavailable,
    // Connections the server dropped during the run (automerge-repo reconnected them).
    client_disconnects: dropped,
    // The fresh client's own work: with stock JS clients it, not the server, may set the pace.
    fresh_client_cpu_seconds: round(fetched.cpuSeconds, 2),
    fresh_messages_received: fetched.messages,
    fresh_bytes_received: fetched.bytes,
    doc_json_bytes: JSON.stringify(household(0)).length,
  }))
  for (const c of children) c.kill()
  process.exit(0)
}

if (role) {
  await client()
} else {
  try {
    await coordinator()
  } catch (e) {
    fail(String(e && e.message ? e.message : e))
  }
}
