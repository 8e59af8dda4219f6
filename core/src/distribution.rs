//! Distributions: a household received an item of a campaign at a site on a date.
//!
//! Handouts live in the household's document, in the map `distributions`, keyed by
//! `campaign/item`. A second handout of the same item in the same campaign is refused on the
//! replica that already knows the first. When two replicas that are both offline each record
//! one, both `put`s land on the same key, and after merge Automerge keeps both values as a
//! conflict on that key: the double handout is detected by reading the key, with no extra
//! coordination and without trusting clocks.

use automerge::{ObjType, ReadDoc, ROOT};
use autosurgeon::{Hydrate, Reconcile};
use serde::{Deserialize, Serialize};

/// Name of the map in a household document that holds its handouts.
pub const DISTRIBUTIONS: &str = "distributions";

/// One handout.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Distribution {
    /// Campaign code.
    pub campaign: String,
    /// Item code.
    pub item: String,
    /// Quantity handed over.
    pub quantity: u32,
    /// Site where it was handed over.
    pub site: String,
    /// Date, `YYYY-MM-DD`.
    pub date: String,
    /// Enumerator who recorded it.
    pub enumerator: String,
    /// Device it was recorded on.
    pub device: String,
    /// Unix time in milliseconds when it was recorded.
    pub at: i64,
}

/// The key of a handout in the `distributions` map.
pub fn key(campaign: &str, item: &str) -> String {
    format!("{campaign}/{item}")
}

/// Every handout recorded under one `campaign/item` key. More than one handout means the
/// household was served twice (a double distribution).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandoutSlot {
    /// Campaign code.
    pub campaign: String,
    /// Item code.
    pub item: String,
    /// All handouts, in Automerge's deterministic order (the same on every replica).
    pub handouts: Vec<Distribution>,
}

impl HandoutSlot {
    /// True when the same item of the same campaign was handed over more than once.
    pub fn is_double(&self) -> bool {
        self.handouts.len() > 1
    }
}

/// Reads every handout slot of a household document.
pub fn slots(doc: &automerge::Automerge) -> Vec<HandoutSlot> {
    let Ok(Some((_, map))) = doc.get(ROOT, DISTRIBUTIONS) else {
        return Vec::new();
    };
    let keys: Vec<String> = doc.keys(&map).collect();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let Ok(values) = doc.get_all(&map, k.as_str()) else {
            continue;
        };
        let handouts: Vec<Distribution> = values
            .into_iter()
            .filter(|(v, _)| matches!(v, automerge::Value::Object(ObjType::Map)))
            .filter_map(|(_, obj)| Distribution::hydrate_map(doc, &obj).ok())
            .collect();
        if let Some(first) = handouts.first() {
            out.push(HandoutSlot {
                campaign: first.campaign.clone(),
                item: first.item.clone(),
                handouts,
            });
        }
    }
    out
}
