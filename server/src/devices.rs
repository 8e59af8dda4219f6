//! When each device was last connected, for `GET /api/v1/devices`.
//!
//! Kept in memory and written to the store every [`FLUSH_EVERY`] and at shutdown: a
//! connection costs no disk write, and a crash loses at most that much of "last seen".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use relais_core::audit::now_ms;
use relais_core::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");

/// How often last-seen times are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// What is known of one device (token name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Last connect or disconnect, ms since the epoch.
    pub last_seen: i64,
    /// Open connections now.
    #[serde(skip)]
    pub connections: u32,
}

/// Last-seen registry.
#[derive(Debug, Default)]
pub struct Devices {
    map: Mutex<(HashMap<String, Seen>, bool)>,
}

impl Devices {
    /// Loads what the store remembers.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let txn = store.database()?.begin_read()?;
        let mut map = HashMap::new();
        match txn.open_table(DEVICES) {
            Ok(t) => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    if let Ok(s) = serde_json::from_slice::<Seen>(v.value()) {
                        map.insert(k.value().to_string(), s);
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(StoreError::Redb(e.into())),
        }
        Ok(Devices {
            map: Mutex::new((map, false)),
        })
    }

    fn touch(&self, device: &str, delta: i32) {
        let mut g = self.map.lock().expect("not poisoned");
        let s = g.0.entry(device.to_string()).or_default();
        s.last_seen = now_ms();
        s.connections = s.connections.saturating_add_signed(delta);
        g.1 = true;
    }

    /// A connection of `device` opened.
    pub fn connected(&self, device: &str) {
        self.touch(device, 1);
    }

    /// A connection of `device` closed.
    pub fn disconnected(&self, device: &str) {
        self.touch(device, -1);
    }

    /// Every device seen.
    pub fn snapshot(&self) -> HashMap<String, Seen> {
        self.map.lock().expect("not poisoned").0.clone()
    }

    /// Writes last-seen times if anything changed since the last flush.
    pub fn flush(&self, store: &Store) -> Result<(), StoreError> {
        let rows = {
            let mut g = self.map.lock().expect("not poisoned");
            if !g.1 {
                return Ok(());
            }
            g.1 = false;
            g.0.clone()
        };
        let txn = store.database()?.begin_write()?;
        {
            let mut t = txn.open_table(DEVICES)?;
            for (name, s) in rows {
                let bytes = serde_json::to_vec(&s).expect("Seen serialises");
                t.insert(name.as_str(), bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let d = Devices::load(&store).unwrap();
        d.connected("tab-1");
        d.connected("tab-1");
        d.disconnected("tab-1");
        assert_eq!(d.snapshot()["tab-1"].connections, 1);
        d.flush(&store).unwrap();
        let again = Devices::load(&store).unwrap();
        let s = again.snapshot()["tab-1"];
        assert!(s.last_seen > 0);
        assert_eq!(s.connections, 0, "open connections are not persisted");
    }
}
