//! Convergence over random replica trees, without sockets: 1 to 3 servers (a root and
//! offices replicating with a random parent) and 2 to 6 tablets, each a hub over its own
//! redb file, wired as the server engine and relais-client wire them (commit before sending,
//! cursors saved on `Synced`, purges applied). Tablets register, edit, hand out and move
//! households while links are cut and restored, frames are delivered in random order, and
//! servers and tablets restart. Then every link heals; all replicas must hold the same
//! heads for what their scope covers, and every registration and handout must be present.
//!
//! Each seed is a full schedule: topology, operations, cuts, restarts and delivery order. CI
//! runs seeds 1..=24; `RELAIS_TOPOLOGY_SEEDS=N` runs 1..=N (about 0.5 s a seed), and
//! `RELAIS_TOPOLOGY_SEED=S` replays one. Document and actor ids are random, so a replay
//! repeats the schedule but not every byte: hash-ordered choices inside the hub (which
//! document goes out first) may differ, and a rare failure may need a few replays.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relais_core::access::{Identity, Role, Scope};
use relais_core::household::HouseholdUpdate;
use relais_core::ledger::{Ledger, Writer};
use relais_core::protocol::hub::{ConnId, Event, Hub, HubConfig, Step};
use relais_core::store::Store;
use relais_core::DocumentId;

const SITES: [&str; 2] = ["SOC-01", "SOC-02"];
const ITEMS: [&str; 3] = ["nfi-kit", "shelter-kit", "tarpaulin"];

/// A replica: a ledger (for local writes) and a hub sharing one store.
struct Node {
    name: String,
    path: PathBuf,
    ledger: Ledger,
    hub: Hub<Arc<Store>>,
    /// Tablets: the one site their token covers. Servers: `None` (they hold everything).
    site: Option<&'static str>,
    /// The feed sequence up to which local writes were shown to the hub.
    shown: u64,
}

impl Node {
    /// Opens `path`; `boot` tells this run's peer id from the node's earlier ones.
    fn open(path: PathBuf, name: &str, site: Option<&'static str>, boot: u32) -> Node {
        let store = Store::open(&path).unwrap();
        let ledger = Ledger::new(
            store,
            Writer {
                enumerator: format!("enum-{name}"),
                device: name.into(),
            },
        )
        .unwrap();
        let hub = Hub::new(
            HubConfig {
                peer_id: format!("{name}-{boot}"),
                storage_id: Some(name.into()),
                ..HubConfig::default()
            },
            ledger.store_arc(),
        );
        let shown = ledger.store().last_seq().unwrap();
        Node {
            name: name.into(),
            path,
            ledger,
            hub,
            site,
            shown,
        }
    }

    fn store(&self) -> &Store {
        self.ledger.store()
    }

    fn households(&self) -> BTreeMap<DocumentId, (String, Vec<String>)> {
        self.ledger
            .households()
            .unwrap()
            .into_iter()
            .map(|v| {
                let heads = self.store().meta(v.id).unwrap().unwrap().heads;
                (v.id, (v.household.site, heads))
            })
            .collect()
    }
}

/// A link from a child (tablet or office) to its server.
struct Link {
    child: usize,
    server: usize,
    up: bool,
    conn_child: ConnId,
    conn_server: ConnId,
    to_server: VecDeque<Vec<u8>>,
    to_child: VecDeque<Vec<u8>>,
    /// The child's saved cursors: remote, local, server's peer id.
    cursors: (u64, u64, Option<String>),
}

struct World {
    nodes: Vec<Node>,
    links: Vec<Link>,
    next_conn: ConnId,
    log: Vec<String>,
    seed: u64,
    boots: u32,
}

impl World {
    fn identity_of(&self, child: usize) -> Identity {
        let n = &self.nodes[child];
        match n.site {
            Some(site) => Identity {
                device: n.name.clone(),
                role: Role::Enumerator,
                scope: Scope {
                    regions: vec![],
                    sites: vec![site.into()],
                },
                former: None,
            },
            None => Identity {
                device: n.name.clone(),
                role: Role::Replica,
                scope: Scope::all(),
                former: None,
            },
        }
    }

    fn connect(&mut self, l: usize) {
        let (child, server) = (self.links[l].child, self.links[l].server);
        let (cc, cs) = (self.next_conn, self.next_conn + 1);
        self.next_conn += 2;
        let who = self.identity_of(child);
        self.nodes[server].hub.connect(cs, who);
        let (remote, local, peer) = self.links[l].cursors.clone();
        let link = &mut self.links[l];
        link.up = true;
        link.conn_child = cc;
        link.conn_server = cs;
        let step = self.nodes[child].hub.connect_outbound(
            cc,
            Identity::admin("server"),
            remote,
            local,
            peer,
        );
        self.absorb(child, step);
    }

    fn cut(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.up {
            return;
        }
        link.up = false;
        link.to_child.clear();
        link.to_server.clear();
        let (child, server, cc, cs) = (link.child, link.server, link.conn_child, link.conn_server);
        self.nodes[child].hub.disconnect(cc);
        self.nodes[server].hub.disconnect(cs);
    }

    fn note(&mut self, s: String) {
        self.log.push(s);
    }

    /// Which link and side a connection of `node` belongs to (`true`: the child's side).
    fn link_of(&self, node: usize, conn: ConnId) -> Option<(usize, bool)> {
        self.links.iter().enumerate().find_map(|(i, l)| {
            if !l.up {
                None
            } else if l.child == node && l.conn_child == conn {
                Some((i, true))
            } else if l.server == node && l.conn_server == conn {
                Some((i, false))
            } else {
                None
            }
        })
    }

    /// What the adapters do with a step: commit, act on events, then send.
    fn absorb(&mut self, node: usize, step: Step) {
        let Step {
            writes,
            sends,
            closes,
            audit,
            events,
            ..
        } = step;
        self.nodes[node].store().commit(&writes, &audit).unwrap();
        let mut sends = sends;
        for e in events {
            match e {
                Event::Synced {
                    conn,
                    remote_cursor,
                    local_cursor,
                    peer,
                } => {
                    if let Some((l, true)) = self.link_of(node, conn) {
                        self.links[l].cursors = (remote_cursor, local_cursor, Some(peer));
                    }
                }
                Event::Purge { id, erased, .. } => {
                    let n = &mut self.nodes[node];
                    let Some(meta) = n.store().meta(id).unwrap() else {
                        continue;
                    };
                    if erased {
                        n.store().erase(id, &[]).unwrap();
                    } else if n.site.is_some() {
                        n.store().remove(id).unwrap();
                    } else {
                        n.store().forget(id).unwrap();
                    }
                    let s = n.hub.purged(id, &meta.info, erased);
                    sends.extend(s.sends);
                }
                _ => {}
            }
        }
        let states = self.nodes[node].hub.take_sync_states();
        self.nodes[node].store().put_sync_states(&states).unwrap();
        for (conn, frame) in sends {
            match self.link_of(node, conn) {
                Some((l, true)) => self.links[l].to_server.push_back(frame),
                Some((l, false)) => self.links[l].to_child.push_back(frame),
                None => {}
            }
        }
        for (conn, reason) in closes {
            if let Some((l, _)) = self.link_of(node, conn) {
                self.log.push(format!(
                    "{} closed a connection: {reason}",
                    self.nodes[node].name
                ));
                self.cut(l);
            }
        }
    }

    /// Delivers one frame on link `l`, in one direction chosen at random when both have some.
    fn deliver(&mut self, l: usize, towards_server: bool) -> bool {
        let link = &mut self.links[l];
        let (to, conn, frame) = if towards_server {
            match link.to_server.pop_front() {
                Some(f) => (link.server, link.conn_server, f),
                None => return false,
            }
        } else {
            match link.to_child.pop_front() {
                Some(f) => (link.child, link.conn_child, f),
                None => return false,
            }
        };
        let step = self.nodes[to].hub.receive(conn, &frame);
        self.absorb(to, step);
        true
    }

    fn busy_links(&self) -> Vec<(usize, bool)> {
        let mut v = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            if l.up && !l.to_server.is_empty() {
                v.push((i, true));
            }
            if l.up && !l.to_child.is_empty() {
                v.push((i, false));
            }
        }
        v
    }

    fn deliver_random(&mut self, rng: &mut StdRng, n: usize) {
        for _ in 0..n {
            let busy = self.busy_links();
            if busy.is_empty() {
                return;
            }
            let (l, dir) = busy[rng.random_range(0..busy.len())];
            self.deliver(l, dir);
        }
    }

    fn quiesce(&mut self, rng: &mut StdRng) {
        for _ in 0..2_000_000 {
            if self.busy_links().is_empty() {
                return;
            }
            self.deliver_random(rng, 1);
        }
        // What keeps going round, to see the loop.
        let mut tail = Vec::new();
        for _ in 0..8 {
            let Some(&(l, dir)) = self.busy_links().first() else {
                break;
            };
            let f = if dir {
                self.links[l].to_server.front()
            } else {
                self.links[l].to_child.front()
            };
            tail.push(format!(
                "link {l}, towards server {dir}: {}",
                describe(f.expect("busy"))
            ));
            self.deliver(l, dir);
        }
        panic!(
            "seed {}: the links never went quiet\n{}\nreplay with RELAIS_TOPOLOGY_SEED={}\n{}",
            self.seed,
            tail.join("\n"),
            self.seed,
            self.log.join("\n")
        );
    }

    /// After a local write: show the hub what changed, as relais-client does.
    fn show_local(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let fresh = n.store().changes_since(n.shown, usize::MAX).unwrap();
        for e in fresh {
            let n = &mut self.nodes[node];
            n.shown = n.shown.max(e.seq);
            let step = n.hub.reload(e.id);
            self.absorb(node, step);
        }
    }

    fn restart(&mut self, node: usize) {
        for l in 0..self.links.len() {
            if self.links[l].child == node || self.links[l].server == node {
                self.cut(l);
            }
        }
        let (path, name, site) = {
            let n = &self.nodes[node];
            (n.path.clone(), n.name.clone(), n.site)
        };
        // Close the old hub and ledger (and with them the file) before reopening it.
        drop(self.nodes.remove(node));
        self.boots += 1;
        let boot = self.boots;
        self.nodes.insert(node, Node::open(path, &name, site, boot));
    }
}

/// What the schedule did, to check against the end state.
#[derive(Default)]
struct Record {
    registered: HashSet<DocumentId>,
    order: Vec<DocumentId>,
    handouts: HashMap<DocumentId, usize>,
    moved: HashSet<DocumentId>,
}

fn run(seed: u64, steps: usize, dir: &Path) {
    let mut rng = StdRng::seed_from_u64(seed);
    let servers = rng.random_range(1..=3usize);
    let tablets = rng.random_range(2..=6usize);
    let mut nodes = Vec::new();
    for s in 0..servers {
        let name = format!("srv{s}");
        nodes.push(Node::open(dir.join(format!("{name}.redb")), &name, None, 0));
    }
    // The root holds the reference data; everyone else gets it by syncing.
    seed_reference(&nodes[0].ledger);
    let mut links = Vec::new();
    let mut topology = Vec::new();
    for s in 1..servers {
        let parent = rng.random_range(0..s);
        topology.push(format!("srv{s}->srv{parent}"));
        links.push((s, parent));
    }
    for t in 0..tablets {
        let name = format!("tab{t}");
        let site = SITES[rng.random_range(0..SITES.len())];
        let idx = nodes.len();
        nodes.push(Node::open(
            dir.join(format!("{name}.redb")),
            &name,
            Some(site),
            0,
        ));
        let home = rng.random_range(0..servers);
        topology.push(format!("{name}@{site}->srv{home}"));
        links.push((idx, home));
        // Some tablets also sync with a second server (a team passing through Bamako).
        if servers > 1 && rng.random_bool(0.3) {
            let other = (home + rng.random_range(1..servers)) % servers;
            topology.push(format!("{name}->srv{other}"));
            links.push((idx, other));
        }
    }
    let mut w = World {
        nodes,
        links: links
            .into_iter()
            .map(|(child, server)| Link {
                child,
                server,
                up: false,
                conn_child: 0,
                conn_server: 0,
                to_server: VecDeque::new(),
                to_child: VecDeque::new(),
                cursors: (0, 0, None),
            })
            .collect(),
        next_conn: 1,
        log: vec![format!("topology: {}", topology.join(", "))],
        seed,
        boots: 0,
    };
    for l in 0..w.links.len() {
        w.connect(l);
    }
    w.quiesce(&mut rng);
    let first_tablet = servers;
    let mut rec = Record::default();
    for step in 0..steps {
        let t = rng.random_range(first_tablet..w.nodes.len());
        let site = w.nodes[t].site.expect("tablet");
        // In registration order, so that a seed picks the same households on a replay.
        let here: HashSet<DocumentId> = w.nodes[t]
            .ledger
            .list_site(site)
            .map(|v| v.into_iter().map(|h| h.id).collect())
            .unwrap_or_default();
        let held: Vec<DocumentId> = rec
            .order
            .iter()
            .copied()
            .filter(|id| here.contains(id))
            .collect();
        let name = w.nodes[t].name.clone();
        match rng.random_range(0..100) {
            0..=24 => {
                if w.nodes[t].ledger.site(site).unwrap().is_none() {
                    // Not yet received its site: the app would refuse to register.
                    continue;
                }
                let id = w.nodes[t]
                    .ledger
                    .register(new_household(site, &format!("{name} {seed}-{step}")))
                    .unwrap();
                rec.registered.insert(id);
                rec.order.push(id);
                w.note(format!("{step}: {name} registers {id}"));
                w.show_local(t);
            }
            25..=39 if !held.is_empty() => {
                let h = held[rng.random_range(0..held.len())];
                let item = ITEMS[rng.random_range(0..ITEMS.len())];
                let ok = w.nodes[t]
                    .ledger
                    .distribute_on(h, "JP-2023", item, 1, "2023-07-10")
                    .is_ok();
                if ok {
                    *rec.handouts.entry(h).or_default() += 1;
                }
                w.note(format!("{step}: {name} hands {item} to {h}: {ok}"));
                w.show_local(t);
            }
            40..=49 if !held.is_empty() => {
                let h = held[rng.random_range(0..held.len())];
                let up = HouseholdUpdate {
                    contact: Some(format!("+223 7{:07}", rng.random_range(0..10_000_000))),
                    ..Default::default()
                };
                let ok = w.nodes[t].ledger.update(h, &up).is_ok();
                w.note(format!("{step}: {name} edits {h}: {ok}"));
                w.show_local(t);
            }
            50..=52 if !held.is_empty() => {
                let h = held[rng.random_range(0..held.len())];
                let to = if site == SITES[0] { SITES[1] } else { SITES[0] };
                let up = HouseholdUpdate {
                    site: Some(to.into()),
                    ..Default::default()
                };
                let ok = w.nodes[t].ledger.update(h, &up).is_ok();
                rec.moved.insert(h);
                w.note(format!("{step}: {name} moves {h} to {to}: {ok}"));
                w.show_local(t);
            }
            53..=66 => {
                let l = rng.random_range(0..w.links.len());
                if w.links[l].up {
                    w.cut(l);
                    w.note(format!("{step}: cut link {l}"));
                } else {
                    w.connect(l);
                    w.note(format!("{step}: restore link {l}"));
                }
            }
            67..=70 => {
                let n = rng.random_range(0..w.nodes.len());
                w.note(format!("{step}: restart {}", w.nodes[n].name));
                w.restart(n);
            }
            _ => {
                let n = rng.random_range(1..40);
                w.deliver_random(&mut rng, n);
            }
        }
        let n = rng.random_range(0..8);
        w.deliver_random(&mut rng, n);
    }
    // Heal: every link up, everything delivered; then fresh sessions until all agree.
    let mut last = String::new();
    for round in 0..5 {
        for l in 0..w.links.len() {
            if round > 0 {
                w.cut(l);
            }
            if !w.links[l].up {
                w.connect(l);
            }
        }
        w.quiesce(&mut rng);
        match check(&w, &rec, first_tablet) {
            Ok(()) => {
                eprintln!(
                    "seed {seed}: {servers} servers, {tablets} tablets, {} households, {} handouts, {} moves; agreed after {} round(s) of fresh sessions",
                    rec.registered.len(),
                    rec.handouts.values().sum::<usize>(),
                    rec.moved.len(),
                    round + 1
                );
                return;
            }
            Err(e) => last = e,
        }
    }
    panic!(
        "seed {seed} did not converge: {last}\nreplay with RELAIS_TOPOLOGY_SEED={seed}\n{}",
        w.log.join("\n")
    );
}

/// A frame in a line: for sync messages, the heads, needs and change count.
fn describe(f: &[u8]) -> String {
    use relais_core::protocol::message::Message;
    let short = |hs: &[automerge::ChangeHash]| -> Vec<String> {
        hs.iter().map(|h| h.to_string()[..8].to_string()).collect()
    };
    match Message::decode(f) {
        Ok(Message::Sync(d)) | Ok(Message::Request(d)) => {
            match automerge::sync::Message::decode(&d.data) {
                Ok(m) => format!(
                    "sync {} heads {:?} need {:?} changes {}",
                    d.document_id,
                    short(&m.heads),
                    short(&m.need),
                    m.changes.len()
                ),
                Err(e) => format!("sync {}: {e}", d.document_id),
            }
        }
        Ok(m) => format!("{m:?}").chars().take(200).collect(),
        Err(e) => e.to_string(),
    }
}

fn seed_reference(l: &Ledger) {
    for code in SITES {
        l.put_site(&site(code, "Mopti")).unwrap();
    }
    l.put_campaign(&campaign("JP-2023", &SITES)).unwrap();
}

/// Servers agree on every household (heads and site); each tablet holds exactly the
/// households now at its site, with the same heads; nothing registered or handed out is lost.
fn check(w: &World, rec: &Record, first_tablet: usize) -> Result<(), String> {
    let root = w.nodes[0].households();
    for id in &rec.registered {
        if !root.contains_key(id) {
            return Err(format!("registration {id} missing at the root"));
        }
    }
    for (id, n) in &rec.handouts {
        if rec.moved.contains(id) {
            // A handout written by a tablet after the household left its site is refused.
            continue;
        }
        let v = w.nodes[0]
            .ledger
            .household(*id)
            .map_err(|e| e.to_string())?;
        let got: usize = v.distributions.iter().map(|s| s.handouts.len()).sum();
        if got != *n {
            return Err(format!("{id}: {n} handouts made, {got} at the root"));
        }
    }
    for n in &w.nodes[1..first_tablet] {
        let h = n.households();
        if h != root {
            return Err(format!("{} differs from the root", n.name));
        }
    }
    for n in &w.nodes[first_tablet..] {
        let site = n.site.expect("tablet");
        let want: BTreeMap<_, _> = root
            .iter()
            .filter(|(_, (s, _))| s == site)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let got = n.households();
        if got != want {
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(k)).collect();
            return Err(format!(
                "{} at {site}: missing {missing:?}, extra {extra:?}, or different heads",
                n.name
            ));
        }
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    match (
        std::env::var("RELAIS_TOPOLOGY_SEED").ok(),
        std::env::var("RELAIS_TOPOLOGY_SEEDS").ok(),
    ) {
        (Some(s), _) => vec![s.parse().expect("RELAIS_TOPOLOGY_SEED is a number")],
        (None, Some(n)) => {
            (1..=n.parse::<u64>().expect("RELAIS_TOPOLOGY_SEEDS is a number")).collect()
        }
        (None, None) => (1..=24).collect(),
    }
}

#[test]
fn random_replica_trees_converge_through_partitions_and_restarts() {
    for seed in seeds() {
        let dir = tempfile::tempdir().unwrap();
        run(seed, 80, dir.path());
    }
}
