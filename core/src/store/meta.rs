//! The stored form of a document's [`DocMeta`]: a version byte, then one CBOR array.
//!
//! A listing reads one record per feed entry to decide what the device may see, and a load
//! reads one per document. Decoded from JSON, that was 8.6 % of a server's CPU while 20
//! tablets pushed 1,000 households each (`perf`), most of it in the listings of the tablets'
//! end-of-push cursor check. Records written as JSON by earlier versions (they start with
//! `{`) are still read, and take this form at their document's next write.

use minicbor::{Decoder, Encoder};

use super::{DocMeta, StoreError};
use crate::document::{DocInfo, DocKind};
use crate::DocumentId;

/// First byte of a record in this form. A JSON record starts with `{` (0x7b).
const V1: u8 = 0x01;
/// Fields of the array, in order (see [`encode`]).
const FIELDS: u64 = 10;

/// The record of `meta`, as the store writes it.
pub(super) fn encode(meta: &DocMeta) -> Vec<u8> {
    let mut e = Encoder::new(vec![V1]);
    write(&mut e, meta).expect("writing to a Vec cannot fail");
    e.into_writer()
}

fn write(
    e: &mut Encoder<Vec<u8>>,
    m: &DocMeta,
) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
    e.array(FIELDS)?;
    e.u8(kind_code(m.info.kind))?;
    strings(e, &m.info.sites)?;
    strings(e, &m.info.regions)?;
    e.bool(m.info.erased)?;
    strings(e, &m.heads)?;
    e.u64(m.seq)?;
    e.u32(m.chunks)?;
    strings(e, &m.former_sites)?;
    strings(e, &m.former_regions)?;
    e.bool(m.gone)?;
    Ok(())
}

fn strings(
    e: &mut Encoder<Vec<u8>>,
    items: &[String],
) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
    e.array(items.len() as u64)?;
    for s in items {
        e.str(s)?;
    }
    Ok(())
}

/// Reads a record in either form. A damaged record is [`StoreError::BadMeta`], never a panic.
pub(super) fn decode(id: DocumentId, bytes: &[u8]) -> Result<DocMeta, StoreError> {
    let bad = |reason: String| StoreError::BadMeta { id, reason };
    match bytes.first() {
        Some(&V1) => read(&mut Decoder::new(&bytes[1..])).map_err(|e| bad(e.to_string())),
        _ => serde_json::from_slice(bytes).map_err(|e| bad(e.to_string())),
    }
}

fn read(d: &mut Decoder<'_>) -> Result<DocMeta, minicbor::decode::Error> {
    if d.array()? != Some(FIELDS) {
        return Err(minicbor::decode::Error::message("not a metadata record"));
    }
    let kind = kind_of(d.u8()?)?;
    let sites = read_strings(d)?;
    let regions = read_strings(d)?;
    let erased = d.bool()?;
    let heads = read_strings(d)?;
    let meta = DocMeta {
        info: DocInfo {
            kind,
            sites,
            regions,
            erased,
        },
        heads,
        seq: d.u64()?,
        chunks: d.u32()?,
        former_sites: read_strings(d)?,
        former_regions: read_strings(d)?,
        gone: d.bool()?,
    };
    if d.position() != d.input().len() {
        return Err(minicbor::decode::Error::message(
            "bytes after the metadata record",
        ));
    }
    Ok(meta)
}

fn read_strings(d: &mut Decoder<'_>) -> Result<Vec<String>, minicbor::decode::Error> {
    let Some(n) = d.array()? else {
        return Err(minicbor::decode::Error::message("a list of unknown length"));
    };
    // No capacity from the length: a damaged record could claim billions of items.
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(d.str()?.to_owned());
    }
    Ok(out)
}

fn kind_code(kind: DocKind) -> u8 {
    match kind {
        DocKind::Site => 0,
        DocKind::Household => 1,
        DocKind::Campaign => 2,
        DocKind::Other => 3,
    }
}

fn kind_of(code: u8) -> Result<DocKind, minicbor::decode::Error> {
    Ok(match code {
        0 => DocKind::Site,
        1 => DocKind::Household,
        2 => DocKind::Campaign,
        3 => DocKind::Other,
        _ => return Err(minicbor::decode::Error::message("unknown document kind")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DocMeta {
        DocMeta {
            info: DocInfo {
                kind: DocKind::Household,
                sites: vec!["MOP-003".into()],
                regions: vec!["Mopti".into()],
                erased: false,
            },
            heads: vec!["ab".repeat(32), "cd".repeat(32)],
            seq: 41_977,
            chunks: 3,
            former_sites: vec!["MOP-001".into()],
            former_regions: vec![],
            gone: false,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let id = DocumentId::random();
        let m = sample();
        let bytes = encode(&m);
        assert_eq!(bytes[0], V1);
        assert_eq!(decode(id, &bytes).unwrap(), m);
        let tomb = DocMeta {
            info: DocInfo {
                kind: DocKind::Site,
                erased: true,
                ..m.info.clone()
            },
            gone: true,
            heads: vec![],
            ..m
        };
        assert_eq!(decode(id, &encode(&tomb)).unwrap(), tomb);
    }

    #[test]
    fn a_record_an_earlier_version_wrote_as_json_still_reads() {
        let id = DocumentId::random();
        let m = sample();
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode(id, &json).unwrap(), m);
        // And is smaller once rewritten.
        assert!(encode(&m).len() < json.len());
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let id = DocumentId::random();
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(
                matches!(decode(id, &bytes[..cut]), Err(StoreError::BadMeta { .. })),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(id, &longer).is_err());
        let mut wrong_kind = bytes.clone();
        wrong_kind[2] = 9; // the kind, after the version byte and the array header
        assert!(decode(id, &wrong_kind).is_err());
        // A list that claims more items than there are bytes.
        assert!(decode(
            id,
            &[V1, 0x8a, 0x01, 0x9b, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
        )
        .is_err());
    }
}
