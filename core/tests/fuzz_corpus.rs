//! Replays the cargo-fuzz corpus (`fuzz/corpus/`) on stable Rust, and fuzzes the same entry
//! points with proptest: random bytes, and sessions built from valid messages then damaged.
//! Every input must be handled without a panic.

use std::path::PathBuf;

use automerge::sync::SyncDoc;
use proptest::prelude::*;
use relais_core::protocol::fuzzing::{
    decode_message, hub_session, outbound_session, ERASE_FRAME, OUTBOUND_DOCS,
};
use relais_core::protocol::message::{
    BatchDoc, DocMessage, FeedDoc, Message, PeerMetadata, Refusal,
};

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

/// Runs `target`'s entry point on each input of its committed corpus, which holds at least
/// `seeds` (the seed corpus).
fn replay(target: &str, seeds: usize, run: fn(&[u8])) {
    let inputs = corpus(target);
    assert!(inputs.len() >= seeds, "the seed corpus is committed");
    for (path, bytes) in inputs {
        eprintln!("{}", path.display());
        run(&bytes);
    }
}

#[test]
fn decode_message_corpus() {
    replay("decode_message", 10, decode_message);
}

#[test]
fn hub_session_corpus() {
    replay("hub_session", 5, hub_session);
}

#[test]
fn outbound_session_corpus() {
    replay("outbound_session", 5, outbound_session);
}

/// An empty sync message, and one carrying the whole of a one-change household document.
fn sync_messages() -> (Vec<u8>, Vec<u8>) {
    let empty = automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap()
        .encode();
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
    (empty, full)
}

/// Valid frames a server might send to a tablet: the handshake, a listing that names the
/// tablet's own documents and a new one, purges, refusals, and the documents themselves.
fn valid_server_frames() -> Vec<Vec<u8>> {
    let new = relais_core::DocumentId::from_bytes([9; 16]);
    let own = OUTBOUND_DOCS.map(|d| d.to_string());
    let (empty, full) = sync_messages();
    let dm = |id: String, data: Vec<u8>| DocMessage {
        sender_id: "office".into(),
        target_id: "relais-tablet".into(),
        document_id: id,
        data,
    };
    vec![
        Message::Peer {
            sender_id: "office".into(),
            target_id: "relais-tablet".into(),
            selected_protocol_version: "relais-1".into(),
            peer_metadata: PeerMetadata {
                storage_id: Some("office-storage".into()),
                is_ephemeral: false,
            },
        }
        .encode(),
        Message::Changes {
            sender_id: "office".into(),
            target_id: "relais-tablet".into(),
            docs: vec![
                FeedDoc {
                    document_id: new.to_string(),
                    heads: vec![vec![7; 32]],
                },
                FeedDoc {
                    document_id: own[0].clone(),
                    heads: Vec::new(),
                },
            ],
            cursor: 3,
            more: false,
            purge: vec![own[1].clone()],
            erased: Vec::new(),
            refused: vec![Refusal {
                document_id: own[0].clone(),
                reason: "out of scope".into(),
            }],
        }
        .encode(),
        Message::SyncBatch {
            sender_id: "office".into(),
            target_id: "relais-tablet".into(),
            docs: vec![
                BatchDoc {
                    document_id: new,
                    data: full.clone(),
                    request: false,
                },
                BatchDoc {
                    document_id: OUTBOUND_DOCS[0],
                    data: empty.clone(),
                    request: false,
                },
            ],
        }
        .encode(),
        Message::Sync(dm(own[0].clone(), empty)).encode(),
        Message::Sync(dm(own[1].clone(), full)).encode(),
        Message::DocUnavailable {
            sender_id: "office".into(),
            target_id: "relais-tablet".into(),
            document_id: own[1].clone(),
        }
        .encode(),
        Message::Changes {
            sender_id: "office".into(),
            target_id: "relais-tablet".into(),
            docs: Vec::new(),
            cursor: 4,
            more: false,
            purge: vec![new.to_string()],
            erased: vec![new.to_string()],
            refused: Vec::new(),
        }
        .encode(),
        Message::Error {
            message: "server storage error; retry later".into(),
        }
        .encode(),
    ]
}

/// Valid frames a session might contain.
fn valid_frames() -> Vec<Vec<u8>> {
    let id = relais_core::DocumentId::random().to_string();
    let (empty, full) = sync_messages();
    let empty_request = empty.clone();
    let empty_again = empty.clone();
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
        // The household the session's store holds, which an admin may erase meanwhile.
        Message::Sync(DocMessage {
            document_id: OUTBOUND_DOCS[0].to_string(),
            ..dm(empty_again)
        })
        .encode(),
        ERASE_FRAME.to_vec(),
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

/// The frames `picks` chooses, with bytes flipped and one frame cut short.
fn damaged(
    frames: &[Vec<u8>],
    picks: &[usize],
    flips: &[(usize, u8)],
    cut: Option<usize>,
) -> Vec<Vec<u8>> {
    let mut chosen: Vec<Vec<u8>> = picks.iter().map(|i| frames[*i].clone()).collect();
    for &(at, byte) in flips {
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
    chosen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_message(&bytes);
        hub_session(&bytes);
        outbound_session(&bytes);
    }

    #[test]
    fn damaged_valid_server_sessions_never_panic(
        picks in proptest::collection::vec(0usize..8, 1..12),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut frames = vec![valid_server_frames()[0].clone()];
        frames.extend(damaged(&valid_server_frames(), &picks, &flips, cut));
        outbound_session(&session(&frames));
    }

    #[test]
    fn damaged_valid_sessions_never_panic(
        picks in proptest::collection::vec(0usize..10, 1..12),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let chosen = damaged(&valid_frames(), &picks, &flips, cut);
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
        hs.join("erased-mid-session"),
        session(&[
            frames[0].clone(),
            frames[8].clone(),
            frames[9].clone(),
            frames[8].clone(),
            frames[4].clone(),
        ]),
    )
    .unwrap();
    std::fs::write(
        hs.join("twice"),
        session(&[frames.clone(), frames.clone()].concat()),
    )
    .unwrap();
    let os = root.join("outbound_session");
    std::fs::create_dir_all(&os).unwrap();
    let server = valid_server_frames();
    std::fs::write(os.join("all"), session(&server)).unwrap();
    std::fs::write(os.join("handshake-listing"), session(&server[..2])).unwrap();
    std::fs::write(os.join("no-handshake"), session(&server[1..4])).unwrap();
    std::fs::write(
        os.join("error-then-again"),
        session(&[&server[..3], &server[7..], &server[..7]].concat()),
    )
    .unwrap();
    std::fs::write(
        os.join("purged-then-sent"),
        session(&[server[0].clone(), server[6].clone(), server[2].clone()]),
    )
    .unwrap();
}
