//! Typed domain operations over a [`Store`]: register, update, distribute, list, look up.
//!
//! Every operation validates first and writes nothing when validation fails. A write commits
//! an Automerge change whose actor is this replica's device actor and whose message names the
//! enumerator, device and operation (never personal values), then stores it durably before
//! returning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::{transaction::Transactable, ActorId, Automerge, ChangeHash, ROOT};
use serde::Serialize;

use crate::campaign::Campaign;
use crate::conflict::{conflicts, FieldConflict};
use crate::distribution::{self, Distribution, HandoutSlot, DISTRIBUTIONS};
use crate::document::{self, DocError, DocInfo, DocKind};
use crate::household::{Household, HouseholdUpdate, NewHousehold, Population, Provenance, Status};
use crate::names::normalise;
use crate::site::Site;
use crate::store::{DocWrite, Store, StoreError};
use crate::validation::{check_date, ValidationError};
use crate::DocumentId;

const ACTOR_KEY: &str = "actor";

/// Errors of domain operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The input was refused; nothing was written.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored document does not hold what its kind promises.
    #[error(transparent)]
    Document(#[from] DocError),
    /// Automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(String),
}

impl From<automerge::AutomergeError> for LedgerError {
    fn from(e: automerge::AutomergeError) -> Self {
        LedgerError::Automerge(e.to_string())
    }
}

impl From<autosurgeon::ReconcileError> for LedgerError {
    fn from(e: autosurgeon::ReconcileError) -> Self {
        LedgerError::Automerge(e.to_string())
    }
}

/// Who writes through a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// Enumerator (or operator) code.
    pub enumerator: String,
    /// Device name.
    pub device: String,
}

/// A household with its handouts and conflicts, as an app shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HouseholdView {
    /// Document id.
    pub id: DocumentId,
    /// The record (for a conflicted field, Automerge's deterministic winner).
    pub household: Household,
    /// Handouts, grouped by campaign and item.
    pub distributions: Vec<HandoutSlot>,
    /// Fields written concurrently with different values.
    pub conflicts: Vec<FieldConflict>,
}

/// A household that received the same item of the same campaign more than once.
#[derive(Debug, Clone, Serialize)]
pub struct DoubleDistribution {
    /// The household.
    pub household: DocumentId,
    /// The slot, with every handout.
    pub slot: HandoutSlot,
    /// How a manager resolved it, if they did and nothing new arrived since.
    pub resolution: Option<Resolution>,
}

/// Root map of a household document holding resolutions of double handouts, keyed like
/// `distributions`.
pub const RESOLUTIONS: &str = "resolutions";

/// What a manager decided about a double handout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every handout really happened (e.g. a replacement kit): keep them all.
    ConfirmAll,
    /// Only the handout at this index (as listed) happened; void the others.
    Keep(usize),
}

/// A resolved double handout, synced like any other edit.
#[derive(Debug, Clone, PartialEq, Eq, autosurgeon::Reconcile, autosurgeon::Hydrate, Serialize)]
pub struct Resolution {
    /// `confirmed` or `voided`.
    pub decision: String,
    /// Handouts in the slot when it was resolved: a later one reopens the flag.
    pub handouts: u32,
    /// The handouts voided, as they were recorded.
    pub voided: Vec<Distribution>,
    /// Who resolved it.
    pub by: String,
    /// On which device.
    pub device: String,
    /// When, ms since the epoch.
    pub at: i64,
}

/// Domain operations over a store, writing as one device.
pub struct Ledger {
    store: Arc<Store>,
    writer: Writer,
    actor: ActorId,
    /// Region of each site, with the site document's heads it was read at.
    regions: Mutex<HashMap<String, (Vec<String>, String)>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("store", &self.store)
            .field("device", &self.writer.device)
            .finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Ledger {
    /// Wraps a store. The device's actor id is created on first use and kept in the store, so
    /// the same device always writes with the same actor.
    pub fn new(store: impl Into<Arc<Store>>, writer: Writer) -> Result<Self, LedgerError> {
        let store = store.into();
        let actor = match store.get_meta(ACTOR_KEY)? {
            Some(bytes) => ActorId::from(bytes),
            None => {
                let actor = ActorId::random();
                store.put_meta(ACTOR_KEY, actor.to_bytes())?;
                actor
            }
        };
        Ok(Ledger {
            store,
            writer,
            actor,
            regions: Mutex::new(HashMap::new()),
        })
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store underneath, shared (e.g. with a sync hub).
    pub fn store_arc(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Who writes.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// This device's Automerge actor id.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    fn load(&self, id: DocumentId) -> Result<Option<(Automerge, Vec<ChangeHash>)>, LedgerError> {
        Ok(self.store.load(id)?.map(|s| {
            let heads = s.meta.change_hashes();
            (s.doc.with_actor(self.actor.clone()), heads)
        }))
    }

    fn commit_opts(&self, op: &str) -> automerge::transaction::CommitOptions {
        let msg = serde_json::json!({
            "op": op,
            "by": self.writer.enumerator,
            "device": self.writer.device,
        });
        automerge::transaction::CommitOptions::default()
            .with_message(msg.to_string())
            .with_time(now_ms() / 1000)
    }

    /// The region of a site, if its document is stored here.
    pub fn region_of(&self, site: &str) -> Option<String> {
        let id = DocumentId::derived("site", site);
        let heads = self.store.meta(id).ok().flatten()?.heads;
        if let Some((h, region)) = self.regions.lock().expect("not poisoned").get(site) {
            if *h == heads {
                return Some(region.clone());
            }
        }
        let region = self.site(site).ok().flatten()?.admin1;
        self.regions
            .lock()
            .expect("not poisoned")
            .insert(site.to_string(), (heads, region.clone()));
        Some(region)
    }

    /// Describes a document, resolving site regions through this store.
    pub fn describe(&self, doc: &Automerge) -> DocInfo {
        document::describe(doc, &mut |s| self.region_of(s))
    }

    fn write_of(&self, id: DocumentId, doc: &Automerge, base: Vec<ChangeHash>) -> DocWrite {
        DocWrite::from_doc(id, self.describe(doc), doc, base)
    }

    /// Creates or updates a site. Its id is derived from its code.
    pub fn put_site(&self, site: &Site) -> Result<DocumentId, LedgerError> {
        site.validate()?;
        let id = DocumentId::derived("site", &site.code);
        let (mut doc, base) = self
            .load(id)?
            .unwrap_or_else(|| (Automerge::new().with_actor(self.actor.clone()), Vec::new()));
        let opts = self.commit_opts("put-site");
        doc.transact_with(
            |_| opts,
            |tx| -> Result<(), LedgerError> {
                document::put_record(tx, DocKind::Site, site)?;
                Ok(())
            },
        )
        .map_err(|f| f.error)?;
        let info = DocInfo {
            kind: DocKind::Site,
            sites: vec![site.code.clone()],
            regions: vec![site.admin1.clone()],
            erased: false,
        };
        self.store
            .write(&[DocWrite::from_doc(id, info, &doc, base)])?;
        Ok(id)
    }

    /// Creates or updates a campaign. Every site it names must be known here.
    pub fn put_campaign(&self, campaign: &Campaign) -> Result<DocumentId, LedgerError> {
        campaign.validate()?;
        for s in &campaign.sites {
            if self.site(s)?.is_none() {
                return Err(ValidationError::UnknownSite(s.clone()).into());
            }
        }
        let id = DocumentId::derived("campaign", &campaign.code);
        let (mut doc, base) = self
            .load(id)?
            .unwrap_or_else(|| (Automerge::new().with_actor(self.actor.clone()), Vec::new()));
        let opts = self.commit_opts("put-campaign");
        doc.transact_with(
            |_| opts,
            |tx| document::put_record(tx, DocKind::Campaign, campaign),
        )
        .map_err(|f| f.error)?;
        let w = self.write_of(id, &doc, base);
        self.store.write(&[w])?;
        Ok(id)
    }

    /// A site by code, if known here.
    pub fn site(&self, code: &str) -> Result<Option<Site>, LedgerError> {
        match self.store.load(DocumentId::derived("site", code))? {
            Some(s) => Ok(Some(document::read_site(&s.doc)?)),
            None => Ok(None),
        }
    }

    /// A campaign by code, if known here.
    pub fn campaign(&self, code: &str) -> Result<Option<Campaign>, LedgerError> {
        match self.store.load(DocumentId::derived("campaign", code))? {
            Some(s) => Ok(Some(document::read_campaign(&s.doc)?)),
            None => Ok(None),
        }
    }

    fn of_kind(&self, kind: DocKind) -> Result<Vec<DocumentId>, LedgerError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|(_, m)| m.info.kind == kind && !m.info.erased && !m.gone)
            .map(|(id, _)| id)
            .collect())
    }

    /// Every site known here.
    pub fn sites(&self) -> Result<Vec<Site>, LedgerError> {
        let mut out = Vec::new();
        for id in self.of_kind(DocKind::Site)? {
            if let Some(s) = self.store.load(id)? {
                out.push(document::read_site(&s.doc)?);
            }
        }
        out.sort_by(|a, b| a.code.cmp(&b.code));
        Ok(out)
    }

    /// Every campaign known here.
    pub fn campaigns(&self) -> Result<Vec<Campaign>, LedgerError> {
        let mut out = Vec::new();
        for id in self.of_kind(DocKind::Campaign)? {
            if let Some(s) = self.store.load(id)? {
                out.push(document::read_campaign(&s.doc)?);
            }
        }
        out.sort_by(|a, b| a.code.cmp(&b.code));
        Ok(out)
    }

    /// Registers a household. Only the new household's document is written: the store's site
    /// index lists it under its site, so concurrent registrations never interfere.
    pub fn register(&self, new: NewHousehold) -> Result<DocumentId, LedgerError> {
        let hh = Household {
            size: new.size.unwrap_or(new.members.len() as u32),
            site: new.site,
            head_name: new.head_name.trim().to_string(),
            members: new.members,
            population: if new.host_community {
                Population::Host
            } else {
                Population::Idp
            },
            origin: new.origin,
            displacement_date: new.displacement_date,
            displacement_reason: new.displacement_reason,
            vulnerabilities: new.vulnerabilities,
            contact: new.contact,
            status: Status::Active,
            registered: Provenance {
                enumerator: self.writer.enumerator.clone(),
                device: self.writer.device.clone(),
                at: now_ms(),
            },
        };
        hh.validate()?;
        if self
            .store
            .meta(DocumentId::derived("site", &hh.site))?
            .is_none()
        {
            return Err(ValidationError::UnknownSite(hh.site.clone()).into());
        }
        let id = DocumentId::random();
        let mut doc = Automerge::new().with_actor(self.actor.clone());
        let opts = self.commit_opts("register");
        doc.transact_with(
            |_| opts,
            |tx| -> Result<(), LedgerError> {
                document::put_record(tx, DocKind::Household, &hh)?;
                // Made once, here: two replicas creating it lazily would each make their own
                // map and one set of handouts would hide the other.
                tx.put_object(ROOT, DISTRIBUTIONS, automerge::ObjType::Map)?;
                Ok(())
            },
        )
        .map_err(|f| f.error)?;
        self.store.write(&[self.write_of(id, &doc, Vec::new())])?;
        Ok(id)
    }

    /// Loads a household document, refusing unknown ids.
    fn household_doc(&self, id: DocumentId) -> Result<(Automerge, Vec<ChangeHash>), LedgerError> {
        if self.store.meta(id)?.is_some_and(|m| m.info.erased) {
            return Err(ValidationError::Erased(id.to_string()).into());
        }
        match self.load(id)? {
            Some((doc, base)) if document::kind_of(&doc) == DocKind::Household => Ok((doc, base)),
            _ => Err(ValidationError::UnknownHousehold(id.to_string()).into()),
        }
    }

    /// Changes some fields of a household. Only the fields that change are written, so a
    /// concurrent edit of another field on another replica survives the merge.
    pub fn update(&self, id: DocumentId, update: &HouseholdUpdate) -> Result<(), LedgerError> {
        let (mut doc, base) = self.household_doc(id)?;
        let mut hh = document::read_household(&doc)?;
        // A record saying "erased" (a peer wrote it) is an ordinary household: editing it
        // is how it is set right.
        if update.status == Some(Status::Erased) {
            return Err(ValidationError::EraseByStatus.into());
        }
        let old_site = hh.site.clone();
        hh.apply(update);
        hh.validate()?;
        if hh.site != old_site
            && self
                .store
                .meta(DocumentId::derived("site", &hh.site))?
                .is_none()
        {
            return Err(ValidationError::UnknownSite(hh.site.clone()).into());
        }
        let opts = self.commit_opts("update");
        doc.transact_with(
            |_| opts,
            |tx| document::put_record(tx, DocKind::Household, &hh),
        )
        .map_err(|f| f.error)?;
        self.store.write(&[self.write_of(id, &doc, base)])?;
        Ok(())
    }

    /// Records that a household received `quantity` of `item` under `campaign` today.
    pub fn distribute(
        &self,
        household: DocumentId,
        campaign: &str,
        item: &str,
        quantity: u32,
    ) -> Result<Distribution, LedgerError> {
        let today = today();
        self.distribute_on(household, campaign, item, quantity, &today)
    }

    /// Records a handout on a given date (`YYYY-MM-DD`).
    pub fn distribute_on(
        &self,
        household: DocumentId,
        campaign_code: &str,
        item: &str,
        quantity: u32,
        date: &str,
    ) -> Result<Distribution, LedgerError> {
        check_date(date)?;
        if quantity == 0 {
            return Err(ValidationError::ZeroQuantity.into());
        }
        let campaign = self
            .campaign(campaign_code)?
            .ok_or_else(|| ValidationError::UnknownCampaign(campaign_code.to_string()))?;
        let entitled = campaign
            .entitlement(item)
            .ok_or_else(|| ValidationError::UnknownItem {
                campaign: campaign_code.to_string(),
                item: item.to_string(),
            })?;
        if quantity > entitled {
            return Err(ValidationError::AboveEntitlement {
                item: item.to_string(),
                quantity,
                entitled,
            }
            .into());
        }
        let (mut doc, base) = self.household_doc(household)?;
        let hh = document::read_household(&doc)?;
        if !campaign.sites.is_empty() && !campaign.sites.contains(&hh.site) {
            return Err(ValidationError::SiteNotInCampaign {
                site: hh.site,
                campaign: campaign_code.to_string(),
            }
            .into());
        }
        if distribution::slots(&doc)
            .iter()
            .any(|s| s.campaign == campaign_code && s.item == item)
        {
            return Err(ValidationError::AlreadyReceived {
                campaign: campaign_code.to_string(),
                item: item.to_string(),
            }
            .into());
        }
        let d = Distribution {
            campaign: campaign_code.to_string(),
            item: item.to_string(),
            quantity,
            site: hh.site.clone(),
            date: date.to_string(),
            enumerator: self.writer.enumerator.clone(),
            device: self.writer.device.clone(),
            at: now_ms(),
        };
        let key = distribution::key(campaign_code, item);
        let opts = self.commit_opts("distribute");
        doc.transact_with(
            |_| opts,
            |tx| -> Result<(), LedgerError> {
                let map = document::ensure_map(tx, DISTRIBUTIONS)?;
                autosurgeon::reconcile_prop(tx, &map, key.as_str(), &d)?;
                Ok(())
            },
        )
        .map_err(|f| f.error)?;
        let w = self.write_of(household, &doc, base);
        self.store.write(&[w])?;
        Ok(d)
    }

    /// Erases a household: its document and every trace of its personal data leave this
    /// store, leaving a tombstone that replicas learn to purge and that nothing can overwrite.
    /// `by` is the token name recorded in the audit log.
    pub fn erase(&self, id: DocumentId, by: &str) -> Result<crate::store::DocMeta, LedgerError> {
        self.store
            .erase_household(id, by)?
            .map(|(tomb, _)| tomb)
            .ok_or_else(|| ValidationError::UnknownHousehold(id.to_string()).into())
    }

    /// Resolves a double handout: confirm every handout, or keep one and void the others.
    /// The resolution is an edit of the household document, so it syncs like any other and
    /// records who resolved it and when.
    pub fn resolve_double(
        &self,
        household: DocumentId,
        campaign: &str,
        item: &str,
        decision: Decision,
    ) -> Result<Resolution, LedgerError> {
        let (mut doc, base) = self.household_doc(household)?;
        let slot = distribution::slots(&doc)
            .into_iter()
            .find(|s| s.campaign == campaign && s.item == item && s.is_double())
            .ok_or_else(|| ValidationError::NotDouble {
                campaign: campaign.to_string(),
                item: item.to_string(),
            })?;
        let (kept, voided) = match decision {
            Decision::ConfirmAll => (None, Vec::new()),
            Decision::Keep(i) => {
                let kept = slot
                    .handouts
                    .get(i)
                    .cloned()
                    .ok_or(ValidationError::NoSuchHandout(i))?;
                let voided = slot
                    .handouts
                    .iter()
                    .enumerate()
                    .filter(|(n, _)| *n != i)
                    .map(|(_, d)| d.clone())
                    .collect();
                (Some(kept), voided)
            }
        };
        let resolution = Resolution {
            decision: if kept.is_some() {
                "voided"
            } else {
                "confirmed"
            }
            .into(),
            handouts: if kept.is_some() {
                1
            } else {
                slot.handouts.len() as u32
            },
            voided,
            by: self.writer.enumerator.clone(),
            device: self.writer.device.clone(),
            at: now_ms(),
        };
        let key = distribution::key(campaign, item);
        let opts = self.commit_opts("resolve-double");
        doc.transact_with(
            |_| opts,
            |tx| -> Result<(), LedgerError> {
                if let Some(kept) = &kept {
                    // One new value on the key supersedes every concurrent one.
                    let map = document::ensure_map(tx, DISTRIBUTIONS)?;
                    tx.put_object(&map, key.as_str(), automerge::ObjType::Map)?;
                    autosurgeon::reconcile_prop(tx, &map, key.as_str(), kept)?;
                }
                let map = document::ensure_map(tx, RESOLUTIONS)?;
                autosurgeon::reconcile_prop(tx, &map, key.as_str(), &resolution)?;
                Ok(())
            },
        )
        .map_err(|f| f.error)?;
        self.store.write(&[self.write_of(household, &doc, base)])?;
        Ok(resolution)
    }

    /// Marks `duplicate` as a second registration of `of`. It keeps its history, drops out
    /// of every count, and its handouts count towards `of`.
    pub fn mark_duplicate(&self, duplicate: DocumentId, of: DocumentId) -> Result<(), LedgerError> {
        if duplicate == of {
            return Err(
                ValidationError::BadDuplicate(of.to_string(), "it is the same household").into(),
            );
        }
        let survivor = self.household(of)?;
        if !matches!(survivor.household.status, Status::Active | Status::Returned) {
            return Err(ValidationError::BadDuplicate(
                of.to_string(),
                "that household is itself a duplicate",
            )
            .into());
        }
        self.update(
            duplicate,
            &HouseholdUpdate {
                status: Some(Status::DuplicateOf(of.to_string())),
                ..Default::default()
            },
        )
    }

    /// Possible duplicate registrations among the households stored here (see
    /// [`crate::dedup`] for the measure).
    pub fn duplicate_candidates(&self) -> Result<Vec<crate::dedup::Candidate>, LedgerError> {
        let all: Vec<(DocumentId, Household)> = self
            .households_lite()?
            .into_iter()
            .map(|(id, h, _)| (id, h))
            .collect();
        Ok(crate::dedup::candidates(&all))
    }

    /// Figures over every household stored here for which `include` holds (a caller's
    /// scope), as DTM reports present them.
    pub fn report(
        &self,
        include: impl Fn(&DocInfo) -> bool,
    ) -> Result<crate::report::Figures, LedgerError> {
        let mut report = crate::report::Report::new(&self.sites()?);
        for id in self.household_ids(include)? {
            if let Some((h, slots)) = self.household_lite(id)? {
                report.add(id, &h, &slots);
            }
        }
        Ok(report.finish())
    }

    /// Ids of the households stored here for which `include` holds, without loading them.
    pub fn household_ids(
        &self,
        include: impl Fn(&DocInfo) -> bool,
    ) -> Result<Vec<DocumentId>, LedgerError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|(_, m)| {
                m.info.kind == DocKind::Household && !m.info.erased && !m.gone && include(&m.info)
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// One household's record and handouts, without the conflict walk.
    pub fn household_lite(
        &self,
        id: DocumentId,
    ) -> Result<Option<(Household, Vec<HandoutSlot>)>, LedgerError> {
        match self.store.load(id)? {
            Some(s) if document::kind_of(&s.doc) == DocKind::Household => Ok(Some((
                document::read_household(&s.doc)?,
                distribution::slots(&s.doc),
            ))),
            _ => Ok(None),
        }
    }

    /// Every household with its handouts, without the conflict walk of [`Ledger::household`]
    /// (for reports, exports and duplicate detection).
    pub fn households_lite(
        &self,
    ) -> Result<Vec<(DocumentId, Household, Vec<HandoutSlot>)>, LedgerError> {
        let mut out = Vec::new();
        for id in self.household_ids(|_| true)? {
            if let Some((h, slots)) = self.household_lite(id)? {
                out.push((id, h, slots));
            }
        }
        Ok(out)
    }

    /// A household with its handouts and conflicts.
    pub fn household(&self, id: DocumentId) -> Result<HouseholdView, LedgerError> {
        let (doc, _) = self.household_doc(id)?;
        Ok(HouseholdView {
            id,
            household: document::read_household(&doc)?,
            distributions: distribution::slots(&doc),
            conflicts: conflicts(&doc),
        })
    }

    /// Households living at a site, in id order. Unknown sites are an error.
    pub fn list_site(&self, code: &str) -> Result<Vec<HouseholdView>, LedgerError> {
        if self
            .store
            .meta(DocumentId::derived("site", code))?
            .is_none()
        {
            return Err(ValidationError::UnknownSite(code.to_string()).into());
        }
        let mut out = Vec::new();
        for id in self.store.at_site(code)? {
            let is_household = self
                .store
                .meta(id)?
                .is_some_and(|m| m.info.kind == DocKind::Household && !m.info.erased);
            if is_household {
                out.push(self.household(id)?);
            }
        }
        Ok(out)
    }

    /// Every household document stored here.
    pub fn households(&self) -> Result<Vec<HouseholdView>, LedgerError> {
        let mut out = Vec::new();
        for id in self.of_kind(DocKind::Household)? {
            out.push(self.household(id)?);
        }
        Ok(out)
    }

    /// Households whose head's name contains `query`, ignoring case and accents
    /// (`traore` finds "Aminata Traoré").
    pub fn find_by_name(&self, query: &str) -> Result<Vec<HouseholdView>, LedgerError> {
        let q = normalise(query);
        Ok(self
            .households()?
            .into_iter()
            .filter(|v| normalise(&v.household.head_name).contains(&q))
            .collect())
    }

    /// Every double distribution among the households stored here, resolved or not (see
    /// [`DoubleDistribution::resolution`]).
    pub fn double_distributions(&self) -> Result<Vec<DoubleDistribution>, LedgerError> {
        let mut out = Vec::new();
        for id in self.of_kind(DocKind::Household)? {
            let Some(s) = self.store.load(id)? else {
                continue;
            };
            let resolutions = resolutions(&s.doc);
            for slot in distribution::slots(&s.doc) {
                let key = distribution::key(&slot.campaign, &slot.item);
                let resolution = resolutions
                    .get(&key)
                    .filter(|r| r.handouts as usize >= slot.handouts.len())
                    .cloned();
                // A voided double shows one handout, and stays listed with its resolution.
                if slot.is_double() || resolution.is_some() {
                    out.push(DoubleDistribution {
                        household: id,
                        slot,
                        resolution,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Resolutions recorded in a household document, by `campaign/item`.
fn resolutions(doc: &Automerge) -> HashMap<String, Resolution> {
    use automerge::ReadDoc;
    let Ok(Some((_, map))) = doc.get(ROOT, RESOLUTIONS) else {
        return HashMap::new();
    };
    doc.keys(&map)
        .filter_map(|k| {
            let r: Resolution = autosurgeon::hydrate_prop(doc, &map, k.as_str()).ok()?;
            Some((k, r))
        })
        .collect()
}

/// Today's date in UTC, `YYYY-MM-DD`.
pub fn today() -> String {
    date_of_days(now_ms().div_euclid(86_400_000))
}

/// The UTC date (`YYYY-MM-DD`) of a day number counted from 1970-01-01.
pub fn date_of_days(days: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate for one line.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}
