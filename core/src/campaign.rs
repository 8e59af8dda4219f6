//! Campaigns: what a project hands out, to whom, where and when.

use autosurgeon::{Hydrate, Reconcile};
use serde::{Deserialize, Serialize};

use crate::validation::{check_code, check_date, ValidationError};

/// One item of a campaign and how many each household may receive.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Entitlement {
    /// Item code, e.g. `nfi-kit`, `shelter-kit`, `tarpaulin`, `hygiene-kit`.
    pub item: String,
    /// Quantity per household for the whole campaign.
    pub quantity: u32,
}

/// A distribution campaign, funded under a project.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Campaign {
    /// Short unique code, e.g. `JP-2023`.
    pub code: String,
    /// Full name, e.g. "Responding to the needs of IDPs in northern and central Mali".
    pub name: String,
    /// Donor or project code.
    pub donor: Option<String>,
    /// First day, `YYYY-MM-DD`.
    pub start: Option<String>,
    /// Last day, `YYYY-MM-DD`.
    pub end: Option<String>,
    /// Items and the entitlement per household.
    pub items: Vec<Entitlement>,
    /// Codes of the sites the campaign serves.
    pub sites: Vec<String>,
}

impl Campaign {
    /// Checks codes, dates and quantities.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_code(&self.code)?;
        if self.name.trim().is_empty() {
            return Err(ValidationError::Empty("campaign name"));
        }
        for d in self.start.iter().chain(self.end.iter()) {
            check_date(d)?;
        }
        if self.items.is_empty() {
            return Err(ValidationError::Empty("campaign items"));
        }
        for e in &self.items {
            check_code(&e.item)?;
            if e.quantity == 0 {
                return Err(ValidationError::ZeroQuantity);
            }
        }
        for s in &self.sites {
            check_code(s)?;
        }
        Ok(())
    }

    /// The entitlement for `item`, if the campaign hands it out.
    pub fn entitlement(&self, item: &str) -> Option<u32> {
        self.items
            .iter()
            .find(|e| e.item == item)
            .map(|e| e.quantity)
    }
}

/// Parses `item:quantity` (quantity defaults to 1), as the CLI's `--item nfi-kit:1`.
pub fn parse_entitlement(s: &str) -> Result<Entitlement, ValidationError> {
    let (item, qty) = match s.split_once(':') {
        Some((i, q)) => (
            i,
            q.trim()
                .parse::<u32>()
                .map_err(|_| ValidationError::BadCode(s.to_string()))?,
        ),
        None => (s, 1),
    };
    check_code(item)?;
    if qty == 0 {
        return Err(ValidationError::ZeroQuantity);
    }
    Ok(Entitlement {
        item: item.to_string(),
        quantity: qty,
    })
}
