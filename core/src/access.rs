//! Who a connected device is, and which documents it may read and change.
//!
//! Identity comes from the device's token, checked by the server at the WebSocket upgrade,
//! never from the peer id a client declares.

use serde::{Deserialize, Serialize};

use crate::document::{DocInfo, DocKind};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, including the admin API.
    Admin,
    /// A sub-office server replicating its scope.
    Replica,
    /// A data manager for the regions in scope.
    Manager,
    /// A field tablet for the sites in scope.
    Enumerator,
    /// Read-only access to the sites in scope.
    Viewer,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "admin" => Role::Admin,
            "replica" => Role::Replica,
            "manager" => Role::Manager,
            "enumerator" => Role::Enumerator,
            "viewer" => Role::Viewer,
            other => {
                return Err(format!(
                    "unknown role {other:?}: use admin, replica, manager, enumerator or viewer"
                ))
            }
        })
    }
}

impl Role {
    /// The role's name as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Replica => "replica",
            Role::Manager => "manager",
            Role::Enumerator => "enumerator",
            Role::Viewer => "viewer",
        }
    }
}

/// The regions and sites a token covers. Both empty means the whole store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Regions (admin1), e.g. `Mopti`.
    pub regions: Vec<String>,
    /// Site codes, e.g. `SOC-01`.
    pub sites: Vec<String>,
}

impl Scope {
    /// Everything.
    pub fn all() -> Self {
        Scope::default()
    }

    /// True when the scope is unrestricted.
    pub fn is_all(&self) -> bool {
        self.regions.is_empty() && self.sites.is_empty()
    }

    /// Everything either scope covers.
    pub fn union(&self, other: &Scope) -> Scope {
        if self.is_all() || other.is_all() {
            return Scope::all();
        }
        let mut out = self.clone();
        for r in &other.regions {
            if !out.regions.contains(r) {
                out.regions.push(r.clone());
            }
        }
        for s in &other.sites {
            if !out.sites.contains(s) {
                out.sites.push(s.clone());
            }
        }
        out
    }

    /// True when a document with this description falls in the scope.
    pub fn covers(&self, info: &DocInfo) -> bool {
        if self.is_all() {
            return true;
        }
        if info.kind == DocKind::Other {
            // Documents the domain cannot place belong to no region.
            return false;
        }
        info.sites.iter().any(|s| self.sites.contains(s))
            || info.regions.iter().any(|r| self.regions.contains(r))
    }
}

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Token name, e.g. `tab-mopti-07`. Used in logs and audit.
    pub device: String,
    /// Role.
    pub role: Role,
    /// Scope.
    pub scope: Scope,
    /// The token's scope was changed: what it covered before, so that a device listing
    /// changes from before the change is told to purge what it may no longer hold.
    pub former: Option<FormerScope>,
}

/// What a token covered before its scope last changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormerScope {
    /// Everything the token ever covered before the change.
    pub scope: Scope,
    /// The server's feed sequence when the scope changed: a device whose cursor is older
    /// gets a full listing.
    pub seq: u64,
}

impl Identity {
    /// An unrestricted identity (admin), e.g. for tests and local tools.
    pub fn admin(device: impl Into<String>) -> Self {
        Identity {
            device: device.into(),
            role: Role::Admin,
            scope: Scope::all(),
            former: None,
        }
    }

    /// May this device receive the document?
    pub fn can_read(&self, info: &DocInfo) -> bool {
        self.role == Role::Admin || self.scope.covers(info)
    }

    /// May this device change the document? Viewers change nothing; enumerators change
    /// households only: sites and campaigns are reference data, and a site's region decides
    /// who receives every household registered there.
    pub fn can_write(&self, info: &DocInfo) -> bool {
        match self.role {
            Role::Viewer => false,
            Role::Enumerator => info.kind == DocKind::Household && self.can_read(info),
            _ => self.can_read(info),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: DocKind, site: &str, region: &str) -> DocInfo {
        DocInfo {
            kind,
            sites: vec![site.into()],
            regions: vec![region.into()],
            erased: false,
        }
    }

    #[test]
    fn scopes() {
        let tab = Identity {
            device: "tab".into(),
            role: Role::Enumerator,
            scope: Scope {
                regions: vec![],
                sites: vec!["SOC-01".into()],
            },
            former: None,
        };
        assert!(tab.can_read(&info(DocKind::Household, "SOC-01", "Mopti")));
        assert!(!tab.can_read(&info(DocKind::Household, "SOC-02", "Mopti")));
        assert!(!tab.can_read(&DocInfo::other()));
        let office = Identity {
            device: "mopti".into(),
            role: Role::Replica,
            scope: Scope {
                regions: vec!["Mopti".into()],
                sites: vec![],
            },
            former: None,
        };
        assert!(office.can_read(&info(DocKind::Site, "SOC-02", "Mopti")));
        assert!(!office.can_read(&info(DocKind::Site, "GAO-01", "Gao")));
        let viewer = Identity {
            role: Role::Viewer,
            ..tab.clone()
        };
        assert!(viewer.can_read(&info(DocKind::Household, "SOC-01", "Mopti")));
        assert!(!viewer.can_write(&info(DocKind::Household, "SOC-01", "Mopti")));
        assert!(Identity::admin("a").can_write(&DocInfo::other()));
        // An enumerator reads its site's reference data but writes only households.
        assert!(tab.can_write(&info(DocKind::Household, "SOC-01", "Mopti")));
        for kind in [DocKind::Site, DocKind::Campaign] {
            assert!(tab.can_read(&info(kind, "SOC-01", "Mopti")));
            assert!(!tab.can_write(&info(kind, "SOC-01", "Mopti")));
        }
        let manager = Identity {
            role: Role::Manager,
            ..office.clone()
        };
        assert!(manager.can_write(&info(DocKind::Site, "SOC-02", "Mopti")));
        assert!(!manager.can_write(&info(DocKind::Site, "GAO-01", "Gao")));
    }
}
