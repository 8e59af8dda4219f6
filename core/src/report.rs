//! Figures as DTM reports present them: households and individuals by admin1, admin2 and
//! site, sex and age breakdown, vulnerabilities, and items distributed by campaign, site and
//! item with the households reached.
//!
//! Households marked `duplicate-of` another are not counted; their handouts count towards
//! the household they duplicate. Erased households are gone. Figures are built from a stream
//! of households, holding only the totals, so 100,000 households cost no more memory than 10.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::distribution::HandoutSlot;
use crate::household::{Household, Sex, Status, Vulnerability};
use crate::site::Site;
use crate::DocumentId;

/// Figures for one site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SiteFigures {
    /// Region.
    pub admin1: String,
    /// Cercle.
    pub admin2: String,
    /// Site code.
    pub site: String,
    /// Site name.
    pub site_name: String,
    /// Households.
    pub households: u64,
    /// Individuals (household sizes).
    pub individuals: u64,
    /// Women and girls among recorded members.
    pub female: u64,
    /// Men and boys among recorded members.
    pub male: u64,
    /// Members aged 0 to 4.
    pub age_0_4: u64,
    /// Members aged 5 to 17.
    pub age_5_17: u64,
    /// Members aged 18 to 59.
    pub age_18_59: u64,
    /// Members aged 60 and over.
    pub age_60_plus: u64,
    /// Households with each vulnerability.
    pub vulnerabilities: BTreeMap<String, u64>,
    /// Households with at least one vulnerability (a household with two counts once).
    pub vulnerable_households: u64,
}

impl SiteFigures {
    fn add(&mut self, other: &SiteFigures) {
        self.households += other.households;
        self.individuals += other.individuals;
        self.female += other.female;
        self.male += other.male;
        self.age_0_4 += other.age_0_4;
        self.age_5_17 += other.age_5_17;
        self.age_18_59 += other.age_18_59;
        self.age_60_plus += other.age_60_plus;
        for (k, v) in &other.vulnerabilities {
            *self.vulnerabilities.entry(k.clone()).or_default() += v;
        }
        self.vulnerable_households += other.vulnerable_households;
    }
}

/// Items of one campaign handed out at one site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DistributionFigures {
    /// Campaign code.
    pub campaign: String,
    /// Site code where the items were handed out.
    pub site: String,
    /// Region of the site.
    pub admin1: String,
    /// Item.
    pub item: String,
    /// Quantity handed out.
    pub quantity: u64,
    /// Households that received it (a duplicate counts as the household it duplicates).
    pub households_reached: u64,
}

/// Everything a report shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    /// Per site.
    pub sites: Vec<SiteFigures>,
    /// Per cercle (admin2): `site` and `site_name` are empty.
    pub admin2: Vec<SiteFigures>,
    /// Per region (admin1): `admin2`, `site` and `site_name` are empty.
    pub admin1: Vec<SiteFigures>,
    /// The whole scope.
    pub total: SiteFigures,
    /// Handouts per campaign, site and item.
    pub distributions: Vec<DistributionFigures>,
    /// Households reached per campaign (by any item).
    pub reached_by_campaign: BTreeMap<String, u64>,
    /// Households left out because they duplicate another.
    pub duplicates_excluded: u64,
}

fn vulnerability_name(v: Vulnerability) -> &'static str {
    match v {
        Vulnerability::Widow => "widow",
        Vulnerability::Elderly => "elderly",
        Vulnerability::SingleParent => "single-parent",
        Vulnerability::Disability => "disability",
        Vulnerability::UnaccompaniedChild => "unaccompanied-child",
    }
}

/// Accumulates figures household by household.
#[derive(Debug, Default)]
pub struct Report {
    sites: BTreeMap<String, SiteFigures>,
    known_sites: HashMap<String, (String, String, String)>,
    dist: BTreeMap<(String, String, String), (u64, BTreeSet<DocumentId>)>,
    reached: BTreeMap<String, BTreeSet<DocumentId>>,
    duplicates: u64,
}

impl Report {
    /// A report over these sites (for their names and admin areas).
    pub fn new(sites: &[Site]) -> Self {
        Report {
            known_sites: sites
                .iter()
                .map(|s| {
                    (
                        s.code.clone(),
                        (s.admin1.clone(), s.admin2.clone(), s.name.clone()),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn place(&self, site: &str) -> (String, String, String) {
        self.known_sites
            .get(site)
            .cloned()
            .unwrap_or_else(|| ("unknown".into(), "unknown".into(), site.into()))
    }

    /// Counts one household and its handouts.
    pub fn add(&mut self, id: DocumentId, h: &Household, slots: &[HandoutSlot]) {
        let counted_as = match &h.status {
            Status::DuplicateOf(of) => {
                self.duplicates += 1;
                match of.parse::<DocumentId>() {
                    Ok(survivor) => survivor,
                    Err(_) => id,
                }
            }
            // Erasure leaves no record to count; one that says "erased" came from a peer and
            // is counted like any other.
            Status::Active | Status::Returned | Status::Erased => {
                let (admin1, admin2, site_name) = self.place(&h.site);
                let f = self
                    .sites
                    .entry(h.site.clone())
                    .or_insert_with(|| SiteFigures {
                        admin1,
                        admin2,
                        site: h.site.clone(),
                        site_name,
                        ..Default::default()
                    });
                f.households += 1;
                f.individuals += u64::from(h.size);
                for m in &h.members {
                    match m.sex {
                        Sex::Female => f.female += 1,
                        Sex::Male => f.male += 1,
                    }
                    match m.age {
                        0..=4 => f.age_0_4 += 1,
                        5..=17 => f.age_5_17 += 1,
                        18..=59 => f.age_18_59 += 1,
                        _ => f.age_60_plus += 1,
                    }
                }
                for v in &h.vulnerabilities {
                    *f.vulnerabilities
                        .entry(vulnerability_name(*v).into())
                        .or_default() += 1;
                }
                if !h.vulnerabilities.is_empty() {
                    f.vulnerable_households += 1;
                }
                id
            }
        };
        for slot in slots {
            for d in &slot.handouts {
                let e = self
                    .dist
                    .entry((d.campaign.clone(), d.site.clone(), d.item.clone()))
                    .or_default();
                e.0 += u64::from(d.quantity);
                e.1.insert(counted_as);
                self.reached
                    .entry(d.campaign.clone())
                    .or_default()
                    .insert(counted_as);
            }
        }
    }

    /// The figures.
    pub fn finish(self) -> Figures {
        let sites: Vec<SiteFigures> = self.sites.into_values().collect();
        let mut admin2: BTreeMap<(String, String), SiteFigures> = BTreeMap::new();
        let mut admin1: BTreeMap<String, SiteFigures> = BTreeMap::new();
        let mut total = SiteFigures::default();
        for s in &sites {
            admin2
                .entry((s.admin1.clone(), s.admin2.clone()))
                .or_insert_with(|| SiteFigures {
                    admin1: s.admin1.clone(),
                    admin2: s.admin2.clone(),
                    ..Default::default()
                })
                .add(s);
            admin1
                .entry(s.admin1.clone())
                .or_insert_with(|| SiteFigures {
                    admin1: s.admin1.clone(),
                    ..Default::default()
                })
                .add(s);
            total.add(s);
        }
        let known = &self.known_sites;
        let distributions = self
            .dist
            .into_iter()
            .map(
                |((campaign, site, item), (quantity, hh))| DistributionFigures {
                    admin1: known
                        .get(&site)
                        .map(|p| p.0.clone())
                        .unwrap_or_else(|| "unknown".into()),
                    campaign,
                    site,
                    item,
                    quantity,
                    households_reached: hh.len() as u64,
                },
            )
            .collect();
        Figures {
            sites,
            admin2: admin2.into_values().collect(),
            admin1: admin1.into_values().collect(),
            total,
            distributions,
            reached_by_campaign: self
                .reached
                .into_iter()
                .map(|(c, hh)| (c, hh.len() as u64))
                .collect(),
            duplicates_excluded: self.duplicates,
        }
    }
}
