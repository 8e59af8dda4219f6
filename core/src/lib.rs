//! # relais-core
//!
//! The field domain of Relais (sites, household registrations, campaigns, distributions) as
//! Automerge documents in one redb file, and the automerge-repo sync protocol as a sans-IO
//! state machine that both the server and the client drive.
//!
//! ## Document layout, and why
//!
//! - **One document per household**, holding the registration under `record` and its handouts
//!   under `distributions`. Erasing a household's personal data everywhere means dropping one
//!   document; access can be granted per record; no document grows without bound, since a
//!   household has a handful of members and handouts.
//! - **One document per site**, holding only the site's record. Which households live there
//!   is an index the store keeps from each household's `site` field, not a roster document:
//!   a roster would grow with the site, every registration would rewrite it, and with
//!   Automerge's columnar storage each insert into a large map costs time in proportion to
//!   its size (measured in debug builds: 9 ms per registration at the 250th household of a
//!   site, 17 ms at the 1,000th). Concurrent registrations touch different documents.
//! - **One document per campaign**: name, dates, items and entitlements, sites served.
//! - **Identifiers** are made offline and never collide: households get 16 random bytes;
//!   sites and campaigns get ids derived from their code, so the same code created on two
//!   replicas is one document that merges. Ids print as automerge-repo's bs58check, so a stock
//!   automerge-repo client can address any of them as `automerge:<id>`.
//! - **Double handouts** are a conflict by construction: a handout is stored under the key
//!   `campaign/item`, so two offline tablets serving the same household the same kit write the
//!   same key, and Automerge keeps both values ([`distribution`]).
//! - **Field-level merge**: updates go through autosurgeon, which writes only the fields that
//!   changed; concurrent edits of different fields both survive, and a true conflict on one
//!   field is kept and listed by [`conflict::conflicts`].
//!
//! ## Example
//!
//! ```
//! use relais_core::{household::{parse_members, NewHousehold}, ledger::{Ledger, Writer},
//!     site::{Site, SiteKind}, store::Store, campaign::{Campaign, Entitlement}};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path().join("replica.redb")).unwrap();
//! let ledger = Ledger::new(store, Writer { enumerator: "e-07".into(), device: "tab-mopti-07".into() }).unwrap();
//! ledger.put_site(&Site { code: "SOC-01".into(), name: "Socoura".into(), kind: SiteKind::OfficialSite,
//!     admin1: "Mopti".into(), admin2: "Mopti".into(), admin3: None }).unwrap();
//! ledger.put_campaign(&Campaign { code: "JP-2023".into(), name: "IDPs in northern and central Mali".into(),
//!     donor: None, start: None, end: None,
//!     items: vec![Entitlement { item: "nfi-kit".into(), quantity: 1 }], sites: vec!["SOC-01".into()] }).unwrap();
//!
//! let hh = ledger.register(NewHousehold {
//!     site: "SOC-01".into(),
//!     head_name: "Aminata Traoré".into(),
//!     members: parse_members("F:34,M:12,F:7").unwrap(),
//!     ..Default::default()
//! }).unwrap();
//! ledger.distribute(hh, "JP-2023", "nfi-kit", 1).unwrap();
//! // A second kit of the same campaign is refused on the replica that knows the first.
//! assert!(ledger.distribute(hh, "JP-2023", "nfi-kit", 1).is_err());
//! assert_eq!(ledger.find_by_name("traore").unwrap().len(), 1);
//! ```

#![warn(missing_docs)]

pub mod access;
pub mod audit;
pub mod campaign;
pub mod conflict;
pub mod dedup;
pub mod distribution;
pub mod document;
pub mod export;
pub mod household;
pub mod id;
pub mod ledger;
pub mod names;
pub mod protocol;
mod read_once;
pub mod report;
pub mod site;
pub mod store;
pub mod validation;

pub use id::DocumentId;
