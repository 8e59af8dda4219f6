//! What makes a record invalid. Every check runs before anything is written.

/// Oldest age a member can be recorded with.
pub const MAX_AGE: u8 = 120;

/// Why a record was refused. Nothing was written when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The head of household needs a name for selection committees to call them.
    #[error("the head of household's name is empty")]
    EmptyHeadName,
    /// Ages run from 0 to 120.
    #[error("member {index} has age {age}, outside 0..=120")]
    AgeOutOfRange {
        /// Position of the member in the list, from 0.
        index: usize,
        /// The age given.
        age: u32,
    },
    /// The declared household size must count at least every listed member.
    #[error("household size {size} is below the {members} members listed")]
    SizeBelowMembers {
        /// The declared size.
        size: u32,
        /// How many members were listed.
        members: usize,
    },
    /// A household has at least one member.
    #[error("household size must be at least 1")]
    EmptyHousehold,
    /// The site code is not known on this replica (sync with the office first).
    #[error("unknown site {0}: sync with the office to receive it, or check the code")]
    UnknownSite(String),
    /// The campaign code is not known on this replica.
    #[error("unknown campaign {0}")]
    UnknownCampaign(String),
    /// The campaign does not hand out this item.
    #[error("campaign {campaign} has no item {item}")]
    UnknownItem {
        /// Campaign code.
        campaign: String,
        /// Item asked for.
        item: String,
    },
    /// More than a household is entitled to in this campaign.
    #[error("quantity {quantity} of {item} is above the entitlement of {entitled}")]
    AboveEntitlement {
        /// Item.
        item: String,
        /// Quantity asked for.
        quantity: u32,
        /// What the campaign allows per household.
        entitled: u32,
    },
    /// Quantities are whole, positive numbers.
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    /// The household to update or serve is not on this replica.
    #[error("unknown household {0}")]
    UnknownHousehold(String),
    /// The site is not part of this campaign.
    #[error("site {site} is not part of campaign {campaign}")]
    SiteNotInCampaign {
        /// Site code.
        site: String,
        /// Campaign code.
        campaign: String,
    },
    /// A code (site, campaign, item) is empty or has characters that do not belong in one.
    #[error("invalid code {0:?}: use letters, digits, '-' and '_'")]
    BadCode(String),
    /// A required text field is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// The household already received this item in this campaign (entitled once).
    #[error("household already received {item} in campaign {campaign}")]
    AlreadyReceived {
        /// Campaign code.
        campaign: String,
        /// Item code.
        item: String,
    },
    /// A household that was erased cannot be edited or served again.
    #[error("household {0} was erased")]
    Erased(String),
    /// An edit tried to mark a household erased. Erasure drops its personal data and is an
    /// admin's act (`relais household erase`), not a status.
    #[error("a household is erased with `relais household erase`, which drops its data; its status cannot be set to erased")]
    EraseByStatus,
    /// A date that is not `YYYY-MM-DD`.
    #[error("invalid date {0:?}: use YYYY-MM-DD")]
    BadDate(String),
    /// A resolution was asked for a handout that is not a double.
    #[error("household has no double handout of {item} in campaign {campaign}")]
    NotDouble {
        /// Campaign code.
        campaign: String,
        /// Item code.
        item: String,
    },
    /// The handout to keep is not one of those listed.
    #[error("no handout number {0} in this double distribution")]
    NoSuchHandout(usize),
    /// A household cannot duplicate itself, an erased one, or one that is itself a duplicate.
    #[error("cannot mark as duplicate of {0}: {1}")]
    BadDuplicate(String, &'static str),
}

/// Checks a code: 1 to 64 letters, digits, `-` or `_`.
pub fn check_code(code: &str) -> Result<(), ValidationError> {
    let ok = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadCode(code.chars().take(64).collect()))
    }
}

/// Checks a `YYYY-MM-DD` date (calendar-plausible, not a full calendar check).
pub fn check_date(date: &str) -> Result<(), ValidationError> {
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && digits(0..4)
        && digits(5..7)
        && digits(8..10)
        && matches!(date[5..7].parse::<u8>(), Ok(1..=12))
        && matches!(date[8..10].parse::<u8>(), Ok(1..=31));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadDate(date.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert!(check_code("SOC-01").is_ok());
        assert!(check_code("nfi_kit").is_ok());
        assert_eq!(check_code(""), Err(ValidationError::BadCode(String::new())));
        assert!(check_code("a b").is_err());
        assert!(check_code(&"x".repeat(65)).is_err());
    }

    #[test]
    fn dates() {
        assert!(check_date("2023-07-15").is_ok());
        assert!(check_date("2023-13-01").is_err());
        assert!(check_date("15/07/2023").is_err());
        assert!(check_date("2023-07-1").is_err());
    }
}
