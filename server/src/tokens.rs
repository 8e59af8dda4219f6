//! Device tokens: created by an admin, shown once, kept only as a SHA-256 hash.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use relais_core::access::{FormerScope, Identity, Role, Scope};
use relais_core::audit::{AuditAction, AuditEntry};
use relais_core::store::append_audit;
use relais_core::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const TOKEN_HASHES: TableDefinition<&str, &str> = TableDefinition::new("token_hashes");

/// What is stored about a token. The token itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Device or office name, unique.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Role.
    pub role: Role,
    /// Scope.
    pub scope: Scope,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds, when revoked.
    pub revoked_at: Option<i64>,
    /// What the token covered before its scope last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub former: Option<FormerScope>,
}

impl TokenRecord {
    /// The identity a connection with this token gets.
    pub fn identity(&self) -> Identity {
        Identity {
            device: self.name.clone(),
            role: self.role,
            scope: self.scope.clone(),
            former: self.former.clone(),
        }
    }
}

/// Token errors.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A token of that name exists.
    #[error("a token named {0:?} already exists (revoke it first or choose another name)")]
    Exists(String),
    /// No token of that name.
    #[error("no token named {0:?}")]
    Unknown(String),
    /// Names are 1 to 64 letters, digits, '-', '_' or '.'.
    #[error("invalid token name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// A scope with no site and no region, for a role other than admin, without saying
    /// that the whole store is meant: an empty list is never read as "everything".
    #[error("a {0} token needs sites or regions; to cover the whole store, say so (--all, or \"all\": true)")]
    NoScope(&'static str),
    /// The whole store and some sites or regions at once.
    #[error("either the whole store (--all) or sites and regions, not both")]
    AllAndScope,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::Error> for TokenError {
    fn from(e: redb::Error) -> Self {
        TokenError::Store(StoreError::Redb(e))
    }
}

macro_rules! via_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for TokenError {
            fn from(e: $t) -> Self {
                TokenError::Store(StoreError::Redb(e.into()))
            }
        }
    )*};
}
via_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Hex SHA-256 of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now_ms() -> i64 {
    relais_core::ledger::now_ms()
}

/// The scope a token of `role` gets from what an admin asked for: `scope`, or with `all`
/// the whole store. Empty lists mean "everything" only for an admin or when `all` says so,
/// so that a forgotten `--sites`, or an admin emptying a lost tablet's scope, never hands out
/// every household in the country.
pub fn scope_for(role: Role, scope: Scope, all: bool) -> Result<Scope, TokenError> {
    match (all, scope.is_all()) {
        (true, true) => Ok(Scope::all()),
        (true, false) => Err(TokenError::AllAndScope),
        (false, true) if role != Role::Admin => Err(TokenError::NoScope(role.as_str())),
        (false, _) => Ok(scope),
    }
}

/// Creates a token and returns it with its record. The token is shown once. `scope` is
/// taken as given: what an admin typed goes through [`scope_for`] first.
pub fn create(
    store: &Store,
    name: &str,
    role: Role,
    scope: Scope,
    by: &str,
) -> Result<(String, TokenRecord), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(TokenError::BadName(name.chars().take(64).collect()));
    }
    let secret: [u8; 32] = rand::random();
    let token = format!("rls_{}", hex::encode(secret));
    let record = TokenRecord {
        name: name.to_string(),
        hash: hash(&token),
        role,
        scope,
        created_at: now_ms(),
        revoked_at: None,
        former: None,
    };
    let txn = store.database()?.begin_write()?;
    {
        let mut tokens = txn.open_table(TOKENS)?;
        if tokens.get(name)?.is_some() {
            return Err(TokenError::Exists(name.to_string()));
        }
        let bytes = serde_json::to_vec(&record).expect("record serialises");
        tokens.insert(name, bytes.as_slice())?;
        txn.open_table(TOKEN_HASHES)?
            .insert(record.hash.as_str(), name)?;
    }
    append_audit(
        &txn,
        &[AuditEntry::now(by, AuditAction::TokenCreated, None)
            .with_detail(format!("{name} ({})", role.as_str()))],
    )?;
    txn.commit()?;
    Ok((token, record))
}

/// Every token record, by name.
pub fn list(store: &Store) -> Result<Vec<TokenRecord>, TokenError> {
    let txn = store.database()?.begin_read()?;
    let tokens = match txn.open_table(TOKENS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in tokens.iter()? {
        let (_, v) = row?;
        if let Ok(r) = serde_json::from_slice::<TokenRecord>(v.value()) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Revokes a token by name. Returns the record as revoked.
pub fn revoke(store: &Store, name: &str, by: &str) -> Result<TokenRecord, TokenError> {
    let txn = store.database()?.begin_write()?;
    let record;
    {
        let mut tokens = txn.open_table(TOKENS)?;
        let Some(v) = tokens.get(name)?.map(|g| g.value().to_vec()) else {
            return Err(TokenError::Unknown(name.to_string()));
        };
        let mut r: TokenRecord =
            serde_json::from_slice(&v).map_err(|_| TokenError::Unknown(name.to_string()))?;
        if r.revoked_at.is_none() {
            r.revoked_at = Some(now_ms());
        }
        let bytes = serde_json::to_vec(&r).expect("record serialises");
        tokens.insert(name, bytes.as_slice())?;
        txn.open_table(TOKEN_HASHES)?.remove(r.hash.as_str())?;
        record = r;
    }
    append_audit(
        &txn,
        &[AuditEntry::now(by, AuditAction::TokenRevoked, None).with_detail(name)],
    )?;
    txn.commit()?;
    Ok(record)
}

/// Changes a token's scope, on `by`'s request (recorded in the audit log). Devices using it
/// reconnect with the new scope, and are told to purge what the old scope covered and the
/// new one does not.
pub fn set_scope(
    store: &Store,
    name: &str,
    scope: Scope,
    all: bool,
    by: &str,
) -> Result<TokenRecord, TokenError> {
    let current = {
        let txn = store.database()?.begin_read()?;
        let tokens = txn.open_table(TOKENS)?;
        let v = tokens
            .get(name)?
            .map(|g| g.value().to_vec())
            .ok_or_else(|| TokenError::Unknown(name.to_string()))?;
        serde_json::from_slice::<TokenRecord>(&v)
            .map_err(|_| TokenError::Unknown(name.to_string()))?
    };
    let scope = scope_for(current.role, scope, all)?;
    if current.scope == scope {
        return Ok(current);
    }
    // Devices that listed changes before this point get a full listing once.
    let seq = store.mark_feed()?;
    let mut r = current;
    let before = match &r.former {
        Some(f) => f.scope.union(&r.scope),
        None => r.scope.clone(),
    };
    r.former = Some(FormerScope { scope: before, seq });
    r.scope = scope;
    let txn = store.database()?.begin_write()?;
    {
        let mut tokens = txn.open_table(TOKENS)?;
        let bytes = serde_json::to_vec(&r).expect("record serialises");
        tokens.insert(name, bytes.as_slice())?;
    }
    let detail = format!(
        "{name}: regions [{}], sites [{}]",
        r.scope.regions.join(","),
        r.scope.sites.join(",")
    );
    append_audit(
        &txn,
        &[AuditEntry::now(by, AuditAction::TokenRescoped, None).with_detail(detail)],
    )?;
    txn.commit()?;
    Ok(r)
}

/// The live (not revoked) record for a presented token.
pub fn authenticate(store: &Store, token: &str) -> Result<Option<TokenRecord>, TokenError> {
    let h = hash(token);
    let txn = store.database()?.begin_read()?;
    let hashes = match txn.open_table(TOKEN_HASHES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(name) = hashes.get(h.as_str())?.map(|g| g.value().to_string()) else {
        return Ok(None);
    };
    let tokens = txn.open_table(TOKENS)?;
    let Some(v) = tokens.get(name.as_str())? else {
        return Ok(None);
    };
    let r: TokenRecord = match serde_json::from_slice(v.value()) {
        Ok(r) => r,
        Err(_) => return Ok(None),
    };
    Ok((r.revoked_at.is_none() && r.hash == h).then_some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_scope_is_everything_only_when_said() {
        let soc = Scope {
            regions: vec![],
            sites: vec!["SOC-01".into()],
        };
        assert_eq!(
            scope_for(Role::Enumerator, soc.clone(), false).unwrap(),
            soc
        );
        for role in [Role::Enumerator, Role::Viewer, Role::Manager, Role::Replica] {
            assert!(matches!(
                scope_for(role, Scope::all(), false),
                Err(TokenError::NoScope(r)) if r == role.as_str()
            ));
            assert!(scope_for(role, Scope::all(), true).unwrap().is_all());
        }
        assert!(scope_for(Role::Admin, Scope::all(), false)
            .unwrap()
            .is_all());
        assert!(matches!(
            scope_for(Role::Viewer, soc, true),
            Err(TokenError::AllAndScope)
        ));
        // Emptying a token's scope does not widen it to everything.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let soc = Scope {
            regions: vec![],
            sites: vec!["SOC-01".into()],
        };
        create(&store, "tab-1", Role::Enumerator, soc.clone(), "t").unwrap();
        assert!(matches!(
            set_scope(&store, "tab-1", Scope::all(), false, "t"),
            Err(TokenError::NoScope(_))
        ));
        let r = set_scope(&store, "tab-1", Scope::all(), true, "t").unwrap();
        assert!(r.scope.is_all());
    }

    #[test]
    fn create_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.redb")).unwrap();
        let (tok, rec) = create(&store, "tab-1", Role::Enumerator, Scope::all(), "t").unwrap();
        assert_eq!(rec.hash, hash(&tok));
        assert_eq!(authenticate(&store, &tok).unwrap().unwrap().name, "tab-1");
        assert!(authenticate(&store, "rls_wrong").unwrap().is_none());
        assert!(matches!(
            create(&store, "tab-1", Role::Viewer, Scope::all(), "t"),
            Err(TokenError::Exists(_))
        ));
        assert!(matches!(
            create(&store, "bad name", Role::Viewer, Scope::all(), "t"),
            Err(TokenError::BadName(_))
        ));
        let audit = store.audit_since(0, 10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].1.action, AuditAction::TokenCreated);
        revoke(&store, "tab-1", "t").unwrap();
        assert_eq!(
            store.audit_since(1, 10).unwrap()[0].1.action,
            AuditAction::TokenRevoked
        );
        assert!(authenticate(&store, &tok).unwrap().is_none());
        assert!(list(&store).unwrap()[0].revoked_at.is_some());
        assert!(matches!(
            revoke(&store, "nope", "t"),
            Err(TokenError::Unknown(_))
        ));
    }
}
