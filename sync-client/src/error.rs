//! Errors an app can tell apart.

use relais_core::ledger::LedgerError;
use relais_core::store::StoreError;
use relais_core::validation::ValidationError;

/// Why a replica operation or a sync failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached, or the link dropped. Retry later; nothing is lost.
    #[error("network: {0}")]
    Network(String),
    /// The server's certificate was not trusted, or TLS could not be set up. Retrying will
    /// not help: check the CA or pin given in [`crate::SyncOptions::tls`].
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused the token (unknown, revoked, or too many failed attempts).
    #[error("authentication refused: {0}")]
    Auth(String),
    /// The local store failed.
    #[error("local storage: {0}")]
    Storage(#[from] StoreError),
    /// The input was refused; nothing was written.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The server broke the protocol or closed the connection with a reason.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A stored document is damaged or not what it should be.
    #[error("document: {0}")]
    Document(String),
    /// A background sync was stopped.
    #[error("sync stopped")]
    Stopped,
}

impl From<LedgerError> for ClientError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Validation(v) => ClientError::Validation(v),
            LedgerError::Store(s) => ClientError::Storage(s),
            other => ClientError::Document(other.to_string()),
        }
    }
}
