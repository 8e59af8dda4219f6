//! Sites and localities where displaced people live.

use autosurgeon::{Hydrate, Reconcile};
use serde::{Deserialize, Serialize};

use crate::validation::{check_code, ValidationError};

/// What kind of place a site is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Reconcile, Hydrate, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// An official IDP site, e.g. Socoura in Mopti.
    #[autosurgeon(rename = "official-site")]
    OfficialSite,
    /// Displaced households living in a host community.
    #[autosurgeon(rename = "host-community")]
    HostCommunity,
    /// A collective centre, e.g. the Bandiagara museum building.
    #[autosurgeon(rename = "collective-centre")]
    CollectiveCentre,
}

impl std::str::FromStr for SiteKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "official-site" => Ok(SiteKind::OfficialSite),
            "host-community" => Ok(SiteKind::HostCommunity),
            "collective-centre" | "collective-center" => Ok(SiteKind::CollectiveCentre),
            other => Err(format!(
                "unknown site type {other:?}: use official-site, host-community or collective-centre"
            )),
        }
    }
}

/// A site or locality, with its administrative levels.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Site {
    /// Short unique code, e.g. `SOC-01`.
    pub code: String,
    /// Name as used locally, e.g. `Socoura`.
    pub name: String,
    /// Kind of place.
    pub kind: SiteKind,
    /// Region (admin1), e.g. `Mopti`.
    pub admin1: String,
    /// Cercle (admin2).
    pub admin2: String,
    /// Commune (admin3), when known.
    pub admin3: Option<String>,
}

impl Site {
    /// Socoura (SOC-01, Mopti), the site the unit tests register households at.
    #[cfg(test)]
    pub(crate) fn socoura() -> Site {
        Site {
            code: "SOC-01".into(),
            name: "Socoura".into(),
            kind: SiteKind::OfficialSite,
            admin1: "Mopti".into(),
            admin2: "Mopti".into(),
            admin3: None,
        }
    }

    /// Checks the code and the required names.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_code(&self.code)?;
        if self.name.trim().is_empty() {
            return Err(ValidationError::Empty("site name"));
        }
        if self.admin1.trim().is_empty() {
            return Err(ValidationError::Empty("admin1 (region)"));
        }
        if self.admin2.trim().is_empty() {
            return Err(ValidationError::Empty("admin2 (cercle)"));
        }
        Ok(())
    }
}
