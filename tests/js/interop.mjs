// Drives stock automerge-repo 2.x clients against a running `relais serve`.
// Env: RELAIS_URL = ws://127.0.0.1:PORT/sync?token=..., SITE_URL = automerge:... of a site
// document created by the Rust side. Exits non-zero, with a message, on any failure.
import { Repo, generateAutomergeUrl } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const url = process.env.RELAIS_URL
const siteUrl = process.env.SITE_URL
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const repos = []
const repo = () => {
  const r = new Repo({ network: [new WebSocketClientAdapter(url)] })
  repos.push(r)
  return r
}
function fail(msg) {
  console.error("FAIL: " + msg)
  process.exit(1)
}
setTimeout(() => fail("timed out"), 60_000).unref()

async function eventually(what, check, ms = 20_000) {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (check()) return
    await sleep(50)
  }
  fail(what)
}

async function findWithRetry(u) {
  for (let i = 0; i < 40; i++) {
    const r = repo()
    try {
      const h = await r.find(u)
      return h
    } catch (e) {
      await sleep(250)
    }
  }
  fail("a fresh client could not find " + u)
}

// 1. A creates a document; a fresh client B finds it through the server and reads it.
const a = repo()
const ha = a.create({ note: "from A", count: 1 })
const hb = await findWithRetry(ha.url)
if (hb.doc().note !== "from A") fail("B read " + JSON.stringify(hb.doc()))
console.log("step 1: fresh client found and read the document")

// 2. Edits flow both ways.
hb.change((d) => { d.fromB = "hello" })
await eventually("A did not see B's edit", () => ha.doc().fromB === "hello")
ha.change((d) => { d.count = 2 })
await eventually("B did not see A's edit", () => hb.doc().count === 2)
console.log("step 2: edits flow both ways")

// 3. Concurrent edits converge.
ha.change((d) => { d.x = "a" })
hb.change((d) => { d.y = "b" })
await eventually("concurrent edits did not converge", () => {
  const da = ha.doc(), db = hb.doc()
  return da.x === "a" && da.y === "b" && db.x === "a" && db.y === "b" &&
    JSON.stringify(ha.heads()) === JSON.stringify(hb.heads())
})
console.log("step 3: concurrent edits converged")

// 4. A request for a document nobody has is answered as unavailable.
const c = repo()
let unavailable = false
try {
  await c.find(generateAutomergeUrl())
} catch (e) {
  unavailable = /unavailable/i.test(String(e))
  if (!unavailable) fail("unexpected error for an unknown document: " + e)
}
if (!unavailable) fail("an unknown document was found")
console.log("step 4: unknown document is unavailable")

// 5. A domain document made by Relais is readable by a stock client by its URL.
if (siteUrl) {
  const hs = await findWithRetry(siteUrl)
  const s = hs.doc()
  // Relais writes scalar strings (whole-value conflicts), which JS shows as ImmutableString.
  if (String(s.kind) !== "site" || !s.record || String(s.record.code) !== "SOC-01") fail("site read as " + JSON.stringify(s))
  console.log("step 5: stock client read a Relais site document")
}

for (const r of repos) { try { await r.shutdown() } catch (e) {} }
console.log("js interop ok")
process.exit(0)
