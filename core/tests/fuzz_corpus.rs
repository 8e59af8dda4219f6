//! Replays the cargo-fuzz corpus (`fuzz/corpus/`) on stable Rust, and fuzzes the same entry
//! points with proptest: random bytes, and sessions built from valid messages then damaged.
//! Every input must be handled without a panic.

use std::path::PathBuf;

use automerge::sync::SyncDoc;
use proptest::prelude::*;
use relais_core::protocol::fuzzing::{decode_message, hub_session};
use relais_core::protocol::message::{BatchDoc, DocMessage, Message, PeerMetadata};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("corpus")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        out.push((p.clone(), std::fs::read(&p).unwrap()));
    }
    out.sort();
    out
}

#[test]
fn decode_message_corpus() {
    let inputs = corpus("decode_message");
    assert!(inputs.len() >= 10, "the seed corpus is committed");
    for (path, bytes) in inputs {
        eprintln!("{}", path.display());
        decode_message(&bytes);
    }
}

#[test]
fn hub_session_corpus() {
    let inputs = corpus("hub_session");
    assert!(inputs.len() >= 5, "the seed corpus is committed");
    for (path, bytes) in inputs {
        eprintln!("{}", path.display());
        hub_session(&bytes);
    }
}

/// Valid frames a session might contain.
fn valid_frames() -> Vec<Vec<u8>> {
    let id = relais_core::DocumentId::random().to_string();
    let empty = automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap()
        .encode();
    let empty_request = empty.clone();
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        use automerge::transaction::Transactable;
        tx.put(automerge::ROOT, "kind", "household")?;
        tx.put(automerge::ROOT, "note", "x")?;
        Ok(())
    })
    .unwrap();
    let mut st = automerge::sync::State::new();
    st.their_heads = Some(Vec::new());
    st.their_need = Some(Vec::new());
    st.their_have = Some(vec![automerge::sync::Have::default()]);
    let full = doc.generate_sync_message(&mut st).unwrap().encode();
    let dm = |data: Vec<u8>| DocMessage {
        sender_id: "p".into(),
        target_id: "s".into(),
        document_id: id.clone(),
        data,
    };
    vec![
        Message::Join {
            sender_id: "p".into(),
            supported_protocol_versions: vec!["1".into(), "relais-1".into()],
            peer_metadata: PeerMetadata {
                storage_id: Some("st".into()),
                is_ephemeral: false,
            },
        }
        .encode(),
        Message::Request(dm(empty.clone())).encode(),
        Message::Sync(dm(full.clone())).encode(),
        Message::Sync(dm(empty)).encode(),
        Message::ChangesSince {
            sender_id: "p".into(),
            target_id: "s".into(),
            since: 0,
        }
        .encode(),
        Message::DocUnavailable {
            sender_id: "p".into(),
            target_id: "s".into(),
            document_id: id.clone(),
        }
        .encode(),
        Message::Ephemeral {
            sender_id: "p".into(),
            target_id: "s".into(),
            count: 1,
            session_id: "x".into(),
            document_id: id.clone(),
            data: vec![1, 2, 3],
        }
        .encode(),
        Message::SyncBatch {
            sender_id: "p".into(),
            target_id: "s".into(),
            docs: vec![
                BatchDoc {
                    document_id: id.parse().unwrap(),
                    data: full,
                    request: false,
                },
                BatchDoc {
                    document_id: relais_core::DocumentId::random(),
                    data: empty_request,
                    request: true,
                },
            ],
        }
        .encode(),
    ]
}

fn session(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&f[..f.len().min(u16::MAX as usize)]);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_message(&bytes);
        hub_session(&bytes);
    }

    #[test]
    fn damaged_valid_sessions_never_panic(
        picks in proptest::collection::vec(0usize..8, 1..12),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let frames = valid_frames();
        let mut chosen: Vec<Vec<u8>> = picks.iter().map(|i| frames[*i].clone()).collect();
        for (at, byte) in flips {
            let f = at % chosen.len();
            if !chosen[f].is_empty() {
                let i = at % chosen[f].len();
                chosen[f][i] ^= byte;
            }
        }
        if let Some(c) = cut {
            let f = c % chosen.len();
            let keep = c % (chosen[f].len() + 1);
            chosen[f].truncate(keep);
        }
        for f in &chosen {
            decode_message(f);
        }
        hub_session(&session(&chosen));
    }
}

/// Writes the seed corpus. Run it after changing the message format:
/// `cargo test -p relais-core --test fuzz_corpus -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let frames = valid_frames();
    let dm = root.join("decode_message");
    std::fs::create_dir_all(&dm).unwrap();
    for (i, f) in frames.iter().enumerate() {
        std::fs::write(dm.join(format!("valid-{i}")), f).unwrap();
        std::fs::write(dm.join(format!("truncated-{i}")), &f[..f.len() / 2]).unwrap();
    }
    std::fs::write(dm.join("empty"), b"").unwrap();
    std::fs::write(dm.join("not-a-map"), [0x83, 1, 2, 3]).unwrap();
    std::fs::write(
        dm.join("huge-length"),
        [0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    )
    .unwrap();
    let hs = root.join("hub_session");
    std::fs::create_dir_all(&hs).unwrap();
    std::fs::write(hs.join("join-request-sync"), session(&frames[..4])).unwrap();
    std::fs::write(
        hs.join("join-listing"),
        session(&[frames[0].clone(), frames[4].clone()]),
    )
    .unwrap();
    std::fs::write(hs.join("no-join"), session(&frames[1..3])).unwrap();
    std::fs::write(hs.join("all"), session(&frames)).unwrap();
    std::fs::write(
        hs.join("join-batch"),
        session(&[frames[0].clone(), frames[7].clone()]),
    )
    .unwrap();
    std::fs::write(
        hs.join("twice"),
        session(&[frames.clone(), frames.clone()].concat()),
    )
    .unwrap();
}
