//! CSV exports, plain or HXL-tagged (HXL 1.1: a row of hashtags under the header).
//!
//! Aggregated exports ([`write_sites`], [`write_distributions`]) hold no personal data.
//! The household-level export ([`HouseholdWriter`]) does: the server allows it to admins only
//! and records it in the audit log. Rows are written one at a time, so an export of 100,000
//! households never holds them all in memory.

use std::io::Write;

use crate::distribution::HandoutSlot;
use crate::household::{Household, Population, Sex, Status};
use crate::report::Figures;
use crate::DocumentId;

/// Errors while writing an export.
#[derive(Debug, thiserror::Error)]
#[error("export: {0}")]
pub struct ExportError(#[from] csv::Error);

/// Context printed in every row of an aggregated export.
#[derive(Debug, Clone)]
pub struct ExportContext {
    /// The reporting date (`#date+occurred`), `YYYY-MM-DD`.
    pub date: String,
    /// The implementing organisation (`#org+impl`).
    pub org: String,
}

/// Header and HXL tags of the per-site export.
pub const SITE_COLUMNS: [(&str, &str); 15] = [
    ("admin1", "#adm1+name"),
    ("admin2", "#adm2+name"),
    ("site_name", "#loc+name"),
    ("site_code", "#loc+code"),
    ("households", "#affected+idps+hh"),
    ("individuals", "#affected+idps+ind"),
    ("female", "#affected+f"),
    ("male", "#affected+m"),
    ("age_0_4", "#affected+age0_4"),
    ("age_5_17", "#affected+age5_17"),
    ("age_18_59", "#affected+age18_59"),
    ("age_60_plus", "#affected+age60plus"),
    ("vulnerable_households", "#affected+vulnerable+hh"),
    ("date", "#date+occurred"),
    ("organisation", "#org+impl"),
];

/// Header and HXL tags of the distributions export.
pub const DISTRIBUTION_COLUMNS: [(&str, &str); 8] = [
    ("campaign", "#activity+code"),
    ("admin1", "#adm1+name"),
    ("site_code", "#loc+code"),
    ("item", "#item+name"),
    ("quantity", "#item+num"),
    ("households_reached", "#reached+hh"),
    ("date", "#date+occurred"),
    ("organisation", "#org+impl"),
];

fn header<W: Write>(
    w: &mut csv::Writer<W>,
    cols: &[(&str, &str)],
    hxl: bool,
) -> Result<(), ExportError> {
    w.write_record(cols.iter().map(|(h, _)| *h))?;
    if hxl {
        w.write_record(cols.iter().map(|(_, t)| *t))?;
    }
    Ok(())
}

/// Households and individuals per site, with sex, age and vulnerability counts.
pub fn write_sites<W: Write>(
    out: W,
    f: &Figures,
    ctx: &ExportContext,
    hxl: bool,
) -> Result<(), ExportError> {
    let mut w = csv::Writer::from_writer(out);
    header(&mut w, &SITE_COLUMNS, hxl)?;
    for s in &f.sites {
        w.write_record([
            s.admin1.clone(),
            s.admin2.clone(),
            s.site_name.clone(),
            s.site.clone(),
            s.households.to_string(),
            s.individuals.to_string(),
            s.female.to_string(),
            s.male.to_string(),
            s.age_0_4.to_string(),
            s.age_5_17.to_string(),
            s.age_18_59.to_string(),
            s.age_60_plus.to_string(),
            s.vulnerable_households.to_string(),
            ctx.date.clone(),
            ctx.org.clone(),
        ])?;
    }
    w.flush().map_err(csv::Error::from)?;
    Ok(())
}

/// Items handed out per campaign, site and item, with households reached.
pub fn write_distributions<W: Write>(
    out: W,
    f: &Figures,
    ctx: &ExportContext,
    hxl: bool,
) -> Result<(), ExportError> {
    let mut w = csv::Writer::from_writer(out);
    header(&mut w, &DISTRIBUTION_COLUMNS, hxl)?;
    for d in &f.distributions {
        w.write_record([
            d.campaign.clone(),
            d.admin1.clone(),
            d.site.clone(),
            d.item.clone(),
            d.quantity.to_string(),
            d.households_reached.to_string(),
            ctx.date.clone(),
            ctx.org.clone(),
        ])?;
    }
    w.flush().map_err(csv::Error::from)?;
    Ok(())
}

/// Columns of the household-level export (personal data).
pub const HOUSEHOLD_COLUMNS: [&str; 14] = [
    "id",
    "site_code",
    "head_name",
    "size",
    "female",
    "male",
    "population",
    "origin",
    "displacement_date",
    "vulnerabilities",
    "contact",
    "status",
    "registered_by",
    "handouts",
];

/// Writes households one row at a time.
pub struct HouseholdWriter<W: Write> {
    w: csv::Writer<W>,
    rows: u64,
}

impl<W: Write> HouseholdWriter<W> {
    /// Starts the export with its header.
    pub fn new(out: W) -> Result<Self, ExportError> {
        let mut w = csv::Writer::from_writer(out);
        w.write_record(HOUSEHOLD_COLUMNS)?;
        Ok(HouseholdWriter { w, rows: 0 })
    }

    /// One household.
    pub fn write(
        &mut self,
        id: DocumentId,
        h: &Household,
        slots: &[HandoutSlot],
    ) -> Result<(), ExportError> {
        let female = h.members.iter().filter(|m| m.sex == Sex::Female).count();
        let vulns: Vec<String> = h
            .vulnerabilities
            .iter()
            .map(|v| {
                serde_json::to_value(v)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        let handouts: Vec<String> = slots
            .iter()
            .map(|s| format!("{}/{}x{}", s.campaign, s.item, s.handouts.len()))
            .collect();
        self.w.write_record([
            id.to_string(),
            h.site.clone(),
            h.head_name.clone(),
            h.size.to_string(),
            female.to_string(),
            (h.members.len() - female).to_string(),
            match h.population {
                Population::Idp => "idp".into(),
                Population::Host => "host".into(),
            },
            h.origin.clone().unwrap_or_default(),
            h.displacement_date.clone().unwrap_or_default(),
            vulns.join(";"),
            h.contact.clone().unwrap_or_default(),
            match &h.status {
                Status::Active => "active".into(),
                Status::Returned => "returned".into(),
                Status::DuplicateOf(of) => format!("duplicate-of:{of}"),
                Status::Erased => "erased".into(),
            },
            h.registered.device.clone(),
            handouts.join(";"),
        ])?;
        self.rows += 1;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(self) -> Result<W, ExportError> {
        self.w
            .into_inner()
            .map_err(|e| ExportError(csv::Error::from(e.into_error())))
    }
}
