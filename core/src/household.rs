//! Household registrations.

use autosurgeon::{Hydrate, Reconcile};
use serde::{Deserialize, Serialize};

use crate::validation::{check_code, check_date, ValidationError, MAX_AGE};

/// Sex as recorded on the registration form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Reconcile, Hydrate, Serialize, Deserialize)]
pub enum Sex {
    /// Female.
    #[autosurgeon(rename = "F")]
    #[serde(rename = "F")]
    Female,
    /// Male.
    #[autosurgeon(rename = "M")]
    #[serde(rename = "M")]
    Male,
}

/// One member of a household. The head is the first member when their sex and age are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Member {
    /// Sex.
    pub sex: Sex,
    /// Age in years, 0 to 120.
    pub age: u32,
}

/// Vulnerability criteria used by selection committees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Reconcile, Hydrate, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vulnerability {
    /// Household headed by a widow.
    #[autosurgeon(rename = "widow")]
    Widow,
    /// Elderly person.
    #[autosurgeon(rename = "elderly")]
    Elderly,
    /// Single parent.
    #[autosurgeon(rename = "single-parent")]
    SingleParent,
    /// Person with a disability.
    #[autosurgeon(rename = "disability")]
    Disability,
    /// Unaccompanied or separated child.
    #[autosurgeon(rename = "unaccompanied-child")]
    UnaccompaniedChild,
}

impl std::str::FromStr for Vulnerability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "widow" => Vulnerability::Widow,
            "elderly" => Vulnerability::Elderly,
            "single-parent" => Vulnerability::SingleParent,
            "disability" => Vulnerability::Disability,
            "unaccompanied-child" | "separated-child" => Vulnerability::UnaccompaniedChild,
            other => {
                return Err(format!(
                "unknown vulnerability {other:?}: use widow, elderly, single-parent, disability or unaccompanied-child"
            ))
            }
        })
    }
}

/// Displaced or host-community household.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Population {
    /// Internally displaced.
    #[autosurgeon(rename = "idp")]
    Idp,
    /// Host community.
    #[autosurgeon(rename = "host")]
    Host,
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Counted and served.
    #[autosurgeon(rename = "active")]
    Active,
    /// Back in the community of origin: a status, not a separate person.
    #[autosurgeon(rename = "returned")]
    Returned,
    /// A duplicate of another registration (its document id): kept, not counted.
    #[autosurgeon(rename = "duplicate-of")]
    DuplicateOf(String),
    /// Never written by Relais: an erased household is a tombstone in the store, with no
    /// record. A record that says "erased" (a peer wrote it) is treated as active, so no
    /// writer can make a household vanish from reports and handouts.
    #[autosurgeon(rename = "erased")]
    Erased,
}

/// Who wrote a record, on which device, and when.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Provenance {
    /// Enumerator's code or name as set on the device.
    pub enumerator: String,
    /// Device name.
    pub device: String,
    /// Unix time in milliseconds.
    pub at: i64,
}

/// A household registration. Distributions live beside it in the same document, see
/// [`crate::distribution`].
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate, Serialize, Deserialize)]
pub struct Household {
    /// Code of the site where the household lives now.
    pub site: String,
    /// Name of the head of household (personal data).
    pub head_name: String,
    /// Members, the head first when known.
    pub members: Vec<Member>,
    /// Declared household size; at least the number of members listed.
    pub size: u32,
    /// Displaced or host community.
    pub population: Population,
    /// Locality of origin.
    pub origin: Option<String>,
    /// Date of displacement, `YYYY-MM-DD`.
    pub displacement_date: Option<String>,
    /// Reason of displacement, e.g. "conflict", "flood".
    pub displacement_reason: Option<String>,
    /// Vulnerability criteria.
    pub vulnerabilities: Vec<Vulnerability>,
    /// Phone or other contact (personal data).
    pub contact: Option<String>,
    /// Status of the registration.
    pub status: Status,
    /// Who registered it.
    pub registered: Provenance,
}

/// What a field worker enters to register a household.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewHousehold {
    /// Site code.
    pub site: String,
    /// Name of the head of household.
    pub head_name: String,
    /// Members, head first.
    pub members: Vec<Member>,
    /// Declared size; `None` means the number of members.
    pub size: Option<u32>,
    /// Host community rather than displaced.
    pub host_community: bool,
    /// Locality of origin.
    pub origin: Option<String>,
    /// Date of displacement, `YYYY-MM-DD`.
    pub displacement_date: Option<String>,
    /// Reason of displacement.
    pub displacement_reason: Option<String>,
    /// Vulnerability criteria.
    pub vulnerabilities: Vec<Vulnerability>,
    /// Contact.
    pub contact: Option<String>,
}

/// Changes to a household; `None` leaves a field as it is, so that concurrent edits to other
/// fields merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HouseholdUpdate {
    /// New head of household name.
    pub head_name: Option<String>,
    /// New member list.
    pub members: Option<Vec<Member>>,
    /// New declared size.
    pub size: Option<u32>,
    /// New site (the household moved).
    pub site: Option<String>,
    /// New origin.
    pub origin: Option<String>,
    /// New displacement reason.
    pub displacement_reason: Option<String>,
    /// New vulnerability list.
    pub vulnerabilities: Option<Vec<Vulnerability>>,
    /// New contact.
    pub contact: Option<String>,
    /// New status.
    pub status: Option<Status>,
}

impl Household {
    /// Checks names, ages, and size against members. Site existence is checked by the ledger.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_code(&self.site)?;
        if self.head_name.trim().is_empty() {
            return Err(ValidationError::EmptyHeadName);
        }
        for (index, m) in self.members.iter().enumerate() {
            if m.age > u32::from(MAX_AGE) {
                return Err(ValidationError::AgeOutOfRange { index, age: m.age });
            }
        }
        if self.size == 0 {
            return Err(ValidationError::EmptyHousehold);
        }
        if (self.size as usize) < self.members.len() {
            return Err(ValidationError::SizeBelowMembers {
                size: self.size,
                members: self.members.len(),
            });
        }
        if let Some(d) = &self.displacement_date {
            check_date(d)?;
        }
        Ok(())
    }

    /// Applies an update in place.
    pub fn apply(&mut self, u: &HouseholdUpdate) {
        if let Some(v) = &u.head_name {
            self.head_name = v.clone();
        }
        if let Some(v) = &u.members {
            self.members = v.clone();
        }
        if let Some(v) = u.size {
            self.size = v;
        }
        if let Some(v) = &u.site {
            self.site = v.clone();
        }
        if let Some(v) = &u.origin {
            self.origin = Some(v.clone());
        }
        if let Some(v) = &u.displacement_reason {
            self.displacement_reason = Some(v.clone());
        }
        if let Some(v) = &u.vulnerabilities {
            self.vulnerabilities = v.clone();
        }
        if let Some(v) = &u.contact {
            self.contact = Some(v.clone());
        }
        if let Some(v) = &u.status {
            self.status = v.clone();
        }
    }

    /// Number of individuals counted in figures (the declared size).
    pub fn individuals(&self) -> u32 {
        self.size
    }
}

/// Parses members written as `F:34,M:12,F:7`.
pub fn parse_members(s: &str) -> Result<Vec<Member>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (sex, age) = p
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("member {p:?}: write SEX:AGE, e.g. F:34"))?;
            let sex = match sex.trim() {
                "F" | "f" => Sex::Female,
                "M" | "m" => Sex::Male,
                other => return Err(format!("member sex {other:?}: use F or M")),
            };
            let age = age
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("member age {age:?} is not a number"))?;
            Ok(Member { sex, age })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Household {
        Household {
            site: "SOC-01".into(),
            head_name: "Aminata Traoré".into(),
            members: parse_members("F:34,M:12,F:7").unwrap(),
            size: 3,
            population: Population::Idp,
            origin: Some("Ségou".into()),
            displacement_date: Some("2023-05-02".into()),
            displacement_reason: Some("conflict".into()),
            vulnerabilities: vec![Vulnerability::Widow],
            contact: None,
            status: Status::Active,
            registered: Provenance {
                enumerator: "e1".into(),
                device: "tab-1".into(),
                at: 0,
            },
        }
    }

    #[test]
    fn valid_household_passes() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn empty_head_name() {
        let mut h = sample();
        h.head_name = "  ".into();
        assert_eq!(h.validate(), Err(ValidationError::EmptyHeadName));
    }

    #[test]
    fn age_out_of_range() {
        let mut h = sample();
        h.members[1].age = 121;
        assert_eq!(
            h.validate(),
            Err(ValidationError::AgeOutOfRange { index: 1, age: 121 })
        );
        h.members[1].age = 120;
        assert_eq!(h.validate(), Ok(()));
    }

    #[test]
    fn size_below_members() {
        let mut h = sample();
        h.size = 2;
        assert_eq!(
            h.validate(),
            Err(ValidationError::SizeBelowMembers {
                size: 2,
                members: 3
            })
        );
        h.size = 0;
        h.members.clear();
        assert_eq!(h.validate(), Err(ValidationError::EmptyHousehold));
    }

    #[test]
    fn bad_displacement_date() {
        let mut h = sample();
        h.displacement_date = Some("yesterday".into());
        assert!(matches!(h.validate(), Err(ValidationError::BadDate(_))));
    }

    #[test]
    fn parse_members_errors() {
        assert!(parse_members("F34").is_err());
        assert!(parse_members("X:3").is_err());
        assert!(parse_members("F:old").is_err());
        assert_eq!(parse_members("").unwrap(), vec![]);
    }
}
