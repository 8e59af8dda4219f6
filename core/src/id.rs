//! Document identifiers, compatible with automerge-repo.
//!
//! A [`DocumentId`] is 16 bytes. Households get random ones, made offline on the device: with
//! 128 random bits two tablets never collide. Sites and campaigns get ids derived from their
//! code, so that two offices that create the same site code address the same document, which
//! then merges instead of existing twice.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The 16-byte id of one Automerge document, shown as bs58check (automerge-repo's form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentId([u8; 16]);

/// Why a string is not a document id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// Not valid bs58check (bad alphabet or checksum).
    #[error("not a bs58check document id: {0}")]
    Encoding(String),
    /// Decoded, but not 16 bytes long.
    #[error("a document id is 16 bytes, this one is {0}")]
    Length(usize),
}

impl DocumentId {
    /// A fresh random id, shaped as a UUID v4 like automerge-repo's own (older
    /// automerge-repo servers refuse ids that are not valid UUIDs). 122 random bits: safe to
    /// make offline on any number of devices.
    pub fn random() -> Self {
        DocumentId(uuid_shape(rand::random(), 4))
    }

    /// The id of a reference document (site, campaign) derived from its kind and code, so
    /// every replica that creates the same code lands on the same document.
    pub fn derived(kind: &str, code: &str) -> Self {
        let digest = Sha256::digest(format!("relais:{kind}:{code}").as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        // Name-based, so shaped as a UUID v5.
        DocumentId(uuid_shape(bytes, 5))
    }

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        DocumentId(bytes)
    }

    /// Wraps a slice that must be 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| IdError::Length(bytes.len()))?;
        Ok(DocumentId(arr))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The `automerge:<id>` URL that automerge-repo clients use.
    pub fn url(&self) -> String {
        format!("automerge:{self}")
    }
}

/// Sets the UUID version nibble and the RFC 4122 variant bits.
fn uuid_shape(mut b: [u8; 16], version: u8) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

/// Longest bs58check text accepted as a document id (a real one has at most 28
/// characters).
const MAX_ID_CHARS: usize = 40;

impl FromStr for DocumentId {
    type Err = IdError;

    /// Accepts both the bare bs58check form and the `automerge:` URL.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s.strip_prefix("automerge:").unwrap_or(s);
        // A real id is 16 bytes and a 4-byte checksum: at most 28 characters. bs58 decoding
        // costs the square of the length, so a long string from a peer would hold the
        // engine for hours before the checksum could refuse it.
        if bare.len() > MAX_ID_CHARS {
            return Err(IdError::Encoding(s.chars().take(64).collect()));
        }
        let bytes = bs58::decode(bare)
            .with_check(None)
            .into_vec()
            .map_err(|_| IdError::Encoding(s.chars().take(64).collect()))?;
        Self::from_slice(&bytes)
    }
}

impl serde::Serialize for DocumentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DocumentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_url() {
        let id = DocumentId::random();
        assert_eq!(id.to_string().parse::<DocumentId>().unwrap(), id);
        assert_eq!(id.url().parse::<DocumentId>().unwrap(), id);
        assert!(id.url().starts_with("automerge:"));
    }

    #[test]
    fn rejects_bad_checksum_and_length() {
        let mut s = DocumentId::random().to_string();
        let last = s.pop().unwrap();
        s.push(if last == '2' { '3' } else { '2' });
        assert!(matches!(s.parse::<DocumentId>(), Err(IdError::Encoding(_))));
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert_eq!(short.parse::<DocumentId>(), Err(IdError::Length(8)));
    }

    #[test]
    fn a_huge_id_is_refused_before_it_is_decoded() {
        // Every 16-byte id fits under the limit, the longest and the shortest.
        for b in [[0xffu8; 16], [0u8; 16], [1u8; 16]] {
            let id = DocumentId::from_bytes(b);
            assert!(id.to_string().len() <= MAX_ID_CHARS);
            assert_eq!(id.to_string().parse::<DocumentId>().unwrap(), id);
        }
        // Decoded, 4 MiB of base58 would take hours (the cost is quadratic): this test
        // would not finish.
        let huge = "2".repeat(4 << 20);
        assert!(matches!(huge.parse::<DocumentId>(), Err(IdError::Encoding(e)) if e.len() == 64));
        let url = format!("automerge:{huge}");
        assert!(url.parse::<DocumentId>().is_err());
    }

    #[test]
    fn ids_are_uuid_shaped() {
        for id in [DocumentId::random(), DocumentId::derived("site", "SOC-01")] {
            let b = id.as_bytes();
            assert!(matches!(b[6] >> 4, 4 | 5), "version nibble");
            assert_eq!(b[8] & 0xc0, 0x80, "variant bits");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(
            DocumentId::derived("site", "SOC-01"),
            DocumentId::derived("site", "SOC-01")
        );
        assert_ne!(
            DocumentId::derived("site", "SOC-01"),
            DocumentId::derived("campaign", "SOC-01")
        );
    }
}
