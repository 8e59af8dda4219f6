//! The audit log: which token did what, to which document, and when.
//!
//! Entries are appended to the store's `audit` table, in the same redb transaction as the
//! write they describe where there is one, and never changed or removed. They hold token
//! names, actions and document ids only: never a personal field value.

use serde::{Deserialize, Serialize};

use crate::DocumentId;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditAction {
    /// A device received a document's content through sync.
    SyncRead,
    /// A device's change to a document was stored.
    Write,
    /// A device's change was refused (out of scope, read-only, erased).
    RefusedWrite,
    /// Household-level data left the server in an export.
    Export,
    /// A household was erased.
    Erase,
    /// A token was created.
    TokenCreated,
    /// A token was revoked.
    TokenRevoked,
    /// A token's scope changed.
    TokenRescoped,
}

impl AuditAction {
    /// The action's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::SyncRead => "sync-read",
            AuditAction::Write => "write",
            AuditAction::RefusedWrite => "refused-write",
            AuditAction::Export => "export",
            AuditAction::Erase => "erase",
            AuditAction::TokenCreated => "token-created",
            AuditAction::TokenRevoked => "token-revoked",
            AuditAction::TokenRescoped => "token-rescoped",
        }
    }
}

impl std::str::FromStr for AuditAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
            format!(
                "unknown audit action {s:?}: use sync-read, write, refused-write, export, erase, token-created or token-revoked"
            )
        })
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, in milliseconds since the Unix epoch (UTC).
    pub at: i64,
    /// The token name that acted (`admin-cli` for the local command line).
    pub token: String,
    /// What it did.
    pub action: AuditAction,
    /// The document concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentId>,
    /// A short non-personal detail: a token name, a reason, an export kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(
        token: impl Into<String>,
        action: AuditAction,
        document: Option<DocumentId>,
    ) -> Self {
        AuditEntry {
            at: now_ms(),
            token: token.into(),
            action,
            document,
            detail: None,
        }
    }

    /// The same entry with a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Which audit entries to return.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only entries at or after this time (ms since the epoch).
    pub since: Option<i64>,
    /// Only entries by this token name.
    pub token: Option<String>,
    /// Only this action.
    pub action: Option<AuditAction>,
    /// Only entries about this document.
    pub document: Option<DocumentId>,
}

impl AuditFilter {
    /// True when the entry passes the filter.
    pub fn matches(&self, e: &AuditEntry) -> bool {
        self.since.is_none_or(|s| e.at >= s)
            && self.token.as_ref().is_none_or(|t| &e.token == t)
            && self.action.is_none_or(|a| e.action == a)
            && self.document.is_none_or(|d| e.document == Some(d))
    }
}

/// Parses a time given on the command line or in a query: `YYYY-MM-DD`,
/// `YYYY-MM-DDTHH:MM[:SS]` (UTC), or milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || format!("cannot read time {s:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC)");
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00:00"));
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let t: Vec<i64> = time
        .trim_end_matches('Z')
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [y, m, day] = d[..] else {
        return Err(bad());
    };
    // Years beyond four digits would overflow the arithmetic below.
    if !(1..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || t.len() < 2
        || t.len() > 3
    {
        return Err(bad());
    }
    let (hh, mm, ss) = (t[0], t[1], t.get(2).copied().unwrap_or(0));
    if !(0..24).contains(&hh) || !(0..60).contains(&mm) || !(0..61).contains(&ss) {
        return Err(bad());
    }
    // Days-from-civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(parse_time("2026-11-23").unwrap(), 1_795_392_000_000);
        assert_eq!(
            parse_time("2026-11-23T01:02:03").unwrap(),
            1_795_395_723_000
        );
        assert_eq!(parse_time("12345").unwrap(), 12345);
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
        assert!(
            parse_time("99999999999999999-01-01").is_err(),
            "a huge year is refused, not overflowed"
        );
    }

    #[test]
    fn actions_round_trip() {
        for a in [
            AuditAction::SyncRead,
            AuditAction::Write,
            AuditAction::RefusedWrite,
            AuditAction::Export,
            AuditAction::Erase,
            AuditAction::TokenCreated,
            AuditAction::TokenRevoked,
        ] {
            assert_eq!(a.as_str().parse::<AuditAction>().unwrap(), a);
        }
        assert!("read".parse::<AuditAction>().is_err());
    }
}
