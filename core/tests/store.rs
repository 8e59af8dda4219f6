//! The store keeps every committed write: across close and reopen, across SIGKILL, through
//! compaction, and when handed corrupt bytes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use automerge::{transaction::Transactable, Automerge, ReadDoc, ROOT};
use common::*;
use relais_core::document::DocInfo;
use relais_core::store::{DocWrite, Store, StoreError, COMPACT_AFTER_CHUNKS, REOPEN_EVERY};
use relais_core::DocumentId;

#[test]
fn reopen_after_close_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (hh, seq) = {
        let l = ledger(dir.path(), "tab");
        seed(&l);
        let hh = l
            .register(new_household("SOC-01", "Kadiatou Sangaré"))
            .unwrap();
        l.distribute(hh, "JP-2023", "nfi-kit", 1).unwrap();
        (hh, l.store().last_seq().unwrap())
    };
    let l = ledger(dir.path(), "tab");
    let v = l.household(hh).unwrap();
    assert_eq!(v.household.head_name, "Kadiatou Sangaré");
    assert_eq!(v.distributions.len(), 1);
    assert_eq!(l.store().last_seq().unwrap(), seq);
}

#[test]
fn compaction_preserves_content_and_heads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    let id = DocumentId::random();
    let mut doc = Automerge::new();
    let mut base = Vec::new();
    // Enough writes to trigger automatic compaction more than once.
    for i in 0..(COMPACT_AFTER_CHUNKS * 2 + 5) {
        let mut tx = doc.transaction();
        tx.put(ROOT, format!("k{}", i % 7), i64::from(i)).unwrap();
        tx.commit();
        store
            .write(&[DocWrite::from_doc(id, DocInfo::other(), &doc, base.clone())])
            .unwrap();
        base = doc.get_heads();
        let meta = store.meta(id).unwrap().unwrap();
        assert!(meta.chunks < COMPACT_AFTER_CHUNKS);
    }
    store.compact(id).unwrap();
    let loaded = store.load(id).unwrap().unwrap();
    assert_eq!(loaded.meta.chunks, 0);
    assert_eq!(loaded.doc.get_heads(), doc.get_heads());
    assert_eq!(loaded.doc.save(), doc.save());
    assert_eq!(loaded.meta.change_hashes().len(), 1);
}

#[test]
fn a_write_from_a_stale_view_keeps_the_union_of_heads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    let id = DocumentId::random();
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "a", 1).map(|_| ()))
        .unwrap();
    store
        .write(&[DocWrite::from_doc(id, DocInfo::other(), &doc, vec![])])
        .unwrap();
    let base = doc.get_heads();
    let mut fork1 = doc.fork();
    let mut fork2 = doc.fork();
    fork1
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "b", 2).map(|_| ()))
        .unwrap();
    fork2
        .transact::<_, _, automerge::AutomergeError>(|tx| tx.put(ROOT, "c", 3).map(|_| ()))
        .unwrap();
    store
        .write(&[DocWrite::from_doc(
            id,
            DocInfo::other(),
            &fork1,
            base.clone(),
        )])
        .unwrap();
    store
        .write(&[DocWrite::from_doc(id, DocInfo::other(), &fork2, base)])
        .unwrap();
    let loaded = store.load(id).unwrap().unwrap();
    assert!(loaded.doc.get(ROOT, "b").unwrap().is_some());
    assert!(loaded.doc.get(ROOT, "c").unwrap().is_some());
    let mut want: Vec<String> = loaded
        .doc
        .get_heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    want.sort();
    assert_eq!(loaded.meta.heads, want);
    assert_eq!(want.len(), 2);
}

#[test]
fn corrupt_bytes_are_an_error_and_the_store_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let hh = l.register(new_household("SOC-01", "Bintou Keïta")).unwrap();
    let good = l.store().load(hh).unwrap().unwrap().doc.save();
    let before = l.store().load(hh).unwrap().unwrap().meta;
    let seq = l.store().last_seq().unwrap();
    let mut bad_inputs: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        good[..good.len() / 2].to_vec(),
        b"\x85\x6f\x4a\x83garbage".to_vec(),
    ];
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 3] ^= 0x55;
    bad_inputs.push(flipped);
    for bad in &bad_inputs {
        let r = l.store().apply(hh, bad, |d| l.describe(d));
        assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
        let fresh = DocumentId::random();
        let r = l.store().apply(fresh, bad, |d| l.describe(d));
        assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
        assert!(l.store().meta(fresh).unwrap().is_none());
        // A new document whose bytes do not load is refused by write too.
        let w = DocWrite {
            id: fresh,
            info: DocInfo::other(),
            base_heads: vec![],
            data: bad.clone(),
            heads: vec![],
            verified: false,
        };
        assert!(l.store().write(&[w]).is_err());
    }
    assert_eq!(l.store().last_seq().unwrap(), seq);
    assert_eq!(l.store().load(hh).unwrap().unwrap().meta, before);
    // Still usable.
    l.distribute(hh, "JP-2023", "nfi-kit", 1).unwrap();
}

#[test]
fn a_damaged_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    assert!(Store::open(&path).is_err());
}

#[test]
fn second_open_of_the_same_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _a = Store::open(&path).unwrap();
    assert!(matches!(Store::open(&path), Err(StoreError::Locked(_))));
}

#[test]
fn feed_lists_each_document_once_at_its_latest_write() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let cursor = l.store().last_seq().unwrap();
    let h1 = l.register(new_household("SOC-01", "A")).unwrap();
    let h2 = l.register(new_household("SOC-01", "B")).unwrap();
    l.distribute(h1, "JP-2023", "nfi-kit", 1).unwrap();
    let since: Vec<DocumentId> = l
        .store()
        .changes_since(cursor, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(since, vec![h2, h1]);
    // The site index lists both households under their site.
    let mut at = l.store().at_site("SOC-01").unwrap();
    at.retain(|id| *id == h1 || *id == h2);
    assert_eq!(at.len(), 2);
    let last = l.store().last_seq().unwrap();
    assert!(l.store().changes_since(last, 100).unwrap().is_empty());
}

/// Child half of the SIGKILL test: writes households forever, printing each id once its
/// write has committed. Run only by `sigkill_mid_write_keeps_every_committed_write`.
#[test]
#[ignore = "child process of the SIGKILL test"]
fn child_writer() {
    let Ok(dir) = std::env::var("RELAIS_CHILD_DIR") else {
        return;
    };
    let l = ledger(std::path::Path::new(&dir), "tab");
    seed(&l);
    let mut i = 0u64;
    loop {
        let hh = l
            .register(new_household("SOC-01", &format!("Household {i}")))
            .unwrap();
        println!("COMMITTED {hh}");
        i += 1;
    }
}

#[test]
fn sigkill_mid_write_keeps_every_committed_write() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--ignored", "--nocapture"])
            .env("RELAIS_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut committed = Vec::new();
        let reader = BufReader::new(child.stdout.take().unwrap());
        for line in reader.lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("COMMITTED ") {
                committed.push(id.parse::<DocumentId>().unwrap());
                if committed.len() >= 40 + round * 25 {
                    break;
                }
            }
        }
        // SIGKILL, in the middle of the next write.
        child.kill().unwrap();
        child.wait().unwrap();
        let l = ledger(dir.path(), "tab");
        for id in &committed {
            let v = l.household(*id).unwrap();
            assert!(v.household.head_name.starts_with("Household "));
        }
        let roster = l.list_site("SOC-01").unwrap();
        assert!(roster.len() >= committed.len());
        // And it takes new writes.
        l.register(new_household("SOC-01", "After restart"))
            .unwrap();
    }
}

#[test]
fn an_erased_household_keeps_only_a_tombstone_that_nothing_overwrites() {
    use relais_core::audit::{AuditAction, AuditEntry};
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let hh = l
        .register(new_household("SOC-01", "Awa Tombstone"))
        .unwrap();
    l.distribute(hh, "JP-2023", "nfi-kit", 1).unwrap();
    let before = l.store().load(hh).unwrap().unwrap();
    let seq_before = before.meta.seq;
    l.erase(hh, "admin").unwrap();
    let meta = l.store().meta(hh).unwrap().unwrap();
    assert!(meta.info.erased);
    assert!(meta.heads.is_empty());
    assert_eq!(meta.info.sites, ["SOC-01"], "kept, to route purge notices");
    assert!(meta.seq > seq_before, "a new feed entry tells replicas");
    assert!(l.store().compact_pending().unwrap());
    // The ledger refuses it, lists skip it.
    assert!(l.household(hh).unwrap_err().to_string().contains("erased"));
    assert!(l.list_site("SOC-01").unwrap().is_empty());
    assert!(l.households().unwrap().is_empty());
    // A write of the old document (a replica pushing its copy) is skipped.
    let w = DocWrite::from_doc(hh, before.meta.info.clone(), &before.doc, Vec::new());
    l.store().write(&[w]).unwrap();
    assert!(l.store().meta(hh).unwrap().unwrap().info.erased);
    assert!(l
        .store()
        .load(hh)
        .unwrap()
        .unwrap()
        .doc
        .get_heads()
        .is_empty());
    // Erasing twice is harmless; unknown ids are refused.
    assert!(l.store().erase(hh, &[]).unwrap().is_some());
    assert!(l.erase(DocumentId::random(), "admin").is_err());
    let audit = l.store().audit_since(0, 10).unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].1.action, AuditAction::Erase);
    assert_eq!(audit[0].1.document, Some(hh));
    l.store()
        .audit(&[AuditEntry::now("x", AuditAction::Export, None)])
        .unwrap();
    assert_eq!(l.store().audit_since(1, 10).unwrap()[0].0, 2);
}

#[test]
fn a_household_that_moves_remembers_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let hh = l.register(new_household("SOC-01", "Moving")).unwrap();
    l.update(
        hh,
        &relais_core::household::HouseholdUpdate {
            site: Some("GAO-01".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let meta = l.store().meta(hh).unwrap().unwrap();
    assert_eq!(meta.info.sites, ["GAO-01"]);
    assert_eq!(meta.former_sites, ["SOC-01"]);
    assert_eq!(meta.former_regions, ["Mopti"]);
    assert_eq!(meta.former_info().sites, ["SOC-01"]);
}

#[test]
fn a_feed_marker_moves_cursors_without_naming_a_document() {
    use relais_core::store::FEED_MARKER;
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let last = l.store().last_seq().unwrap();
    let m1 = l.store().mark_feed().unwrap();
    let m2 = l.store().mark_feed().unwrap();
    assert_eq!((m1, m2), (last + 1, last + 2));
    let after: Vec<_> = l.store().changes_since(last, 100).unwrap();
    assert_eq!(after.len(), 1, "only the latest marker is kept");
    assert_eq!(after[0].id, FEED_MARKER);
    assert_eq!(after[0].seq, m2);
    assert!(l.store().meta(FEED_MARKER).unwrap().is_none());
}

#[test]
fn a_forgotten_document_is_listed_as_gone_and_comes_back_on_a_later_write() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let hh = l.register(new_household("SOC-01", "Leaving")).unwrap();
    let full = l.store().load(hh).unwrap().unwrap();
    let seq = full.meta.seq;
    assert!(l.store().forget(hh).unwrap());
    assert!(!l.store().forget(DocumentId::random()).unwrap());
    let meta = l.store().meta(hh).unwrap().unwrap();
    assert!(meta.gone && meta.seq > seq);
    assert!(l.store().load(hh).unwrap().is_none());
    assert!(l
        .store()
        .at_site("SOC-01")
        .unwrap()
        .iter()
        .all(|id| *id != hh));
    assert!(l.households().unwrap().is_empty());
    // Back in scope: the whole document is written again.
    let w = DocWrite::from_doc(hh, full.meta.info.clone(), &full.doc, Vec::new());
    l.store().write(&[w]).unwrap();
    let back = l.store().load(hh).unwrap().unwrap();
    assert_eq!(back.doc.get_heads(), full.doc.get_heads());
    assert!(!back.meta.gone);
    assert!(l.store().at_site("SOC-01").unwrap().contains(&hh));
    assert_eq!(l.household(hh).unwrap().household.head_name, "Leaving");
}

#[test]
fn reopening_keeps_what_was_committed_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let h = l.register(new_household("SOC-01", "Before")).unwrap();
    let seq = l.store().last_seq().unwrap();
    l.store().reopen().unwrap();
    assert_eq!(l.store().last_seq().unwrap(), seq);
    assert!(l.household(h).is_ok());
    let after = l.register(new_household("SOC-01", "After")).unwrap();
    assert!(l.household(after).is_ok());
    // The file stays locked to this process across the reopen.
    assert!(matches!(
        Store::open(dir.path().join("tab.redb")),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn a_store_that_cannot_be_reopened_reports_closed_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let path = dir.path().join("tab.redb");
    // The file is replaced by something redb cannot open (as a disk that still has no room
    // for its recovery would leave it unopenable).
    let broken = dir.path().join("broken");
    std::fs::write(&broken, vec![0x5a; 8192]).unwrap();
    std::fs::rename(&broken, &path).unwrap();
    assert!(l.store().reopen().is_err());
    assert!(matches!(l.store().last_seq(), Err(StoreError::Closed)));
    assert!(matches!(l.store().database(), Err(StoreError::Closed)));
    assert!(l.register(new_household("SOC-01", "Refused")).is_err());
    // Once the file opens again, so does the store.
    std::fs::remove_file(&path).unwrap();
    l.store().reopen().unwrap();
    assert_eq!(l.store().last_seq().unwrap(), 0);
}

/// A seeded store whose file was moved aside, with `block` put in its place (something
/// redb cannot open), and the reopen that then failed.
struct FileAside {
    l: relais_core::ledger::Ledger,
    path: std::path::PathBuf,
    aside: std::path::PathBuf,
    /// The feed sequence and the number of documents before the file went.
    seq: u64,
    stored: u64,
    /// Bound by each test (as `_dir`): the directory goes when it is dropped.
    _dir: tempfile::TempDir,
}

fn file_aside(block: impl FnOnce(&std::path::Path)) -> FileAside {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), "tab");
    seed(&l);
    let path = dir.path().join("tab.redb");
    let aside = dir.path().join("aside.redb");
    let (seq, stored) = (l.store().last_seq().unwrap(), l.store().len().unwrap());
    std::fs::rename(&path, &aside).unwrap();
    block(&path);
    assert!(l.store().reopen().is_err());
    FileAside {
        l,
        path,
        aside,
        seq,
        stored,
        _dir: dir,
    }
}

/// Long enough for the store to try reopening its file again by itself.
fn after_the_retry_interval() {
    std::thread::sleep(REOPEN_EVERY + std::time::Duration::from_millis(200));
}

#[test]
fn a_store_that_opens_again_serves_reads_without_waiting_for_a_write() {
    // Something redb cannot open takes the file's place.
    let FileAside {
        l,
        path,
        aside,
        seq,
        stored,
        _dir,
    } = file_aside(|p| std::fs::write(p, vec![0x5a; 8192]).unwrap());
    assert!(matches!(l.store().last_seq(), Err(StoreError::Closed)));
    // The file comes back. Nothing is written: a read alone must find it again, once the
    // interval between two attempts has passed.
    std::fs::rename(&aside, &path).unwrap();
    assert!(matches!(l.store().last_seq(), Err(StoreError::Closed)));
    after_the_retry_interval();
    assert_eq!(l.store().last_seq().unwrap(), seq);
    assert_eq!(l.store().len().unwrap(), stored);
    assert!(stored > 0);
}

#[test]
fn a_store_whose_file_is_gone_stays_closed_rather_than_starting_empty() {
    // A failed reopen while the file is away (a volume that came unmounted).
    let FileAside {
        l,
        path,
        aside,
        _dir,
        ..
    } = file_aside(|p| std::fs::create_dir(p).unwrap());
    std::fs::remove_dir(&path).unwrap();
    after_the_retry_interval();
    // Reads and writes retry, but do not put an empty store where the file was.
    assert!(matches!(l.store().last_seq(), Err(StoreError::Closed)));
    assert!(l.register(new_household("SOC-01", "Refused")).is_err());
    assert!(
        !path.exists(),
        "an empty store was created in place of the missing file"
    );
    // The file comes back: so does everything in it.
    std::fs::rename(&aside, &path).unwrap();
    after_the_retry_interval();
    assert!(l.store().last_seq().unwrap() > 0);
}

/// Child half of the full-disk test: runs with SIGXFSZ ignored, caps its own file size
/// (`prlimit --pid`), writes until the store refuses, lifts the cap, and writes again in the
/// same process. Run only by `a_store_writes_again_once_the_disk_has_room`.
#[test]
#[ignore = "child process of the full-disk test"]
fn child_full_disk() {
    let Ok(dir) = std::env::var("RELAIS_FULL_DIR") else {
        return;
    };
    let prlimit = |limit: &str| {
        let ok = Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string()])
            .arg(format!("--fsize={limit}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "prlimit {limit}");
    };
    let l = ledger(std::path::Path::new(&dir), "tab");
    seed(&l);
    let size = std::fs::metadata(l.store().path()).unwrap().len();
    prlimit(&format!("{}:unlimited", size + 64 * 1024));
    let mut written = Vec::new();
    let err = loop {
        match l.register(new_household(
            "SOC-01",
            &format!("Household {}", written.len()),
        )) {
            Ok(id) => written.push(id),
            Err(e) => break e,
        }
        assert!(written.len() < 100_000, "the cap never bit");
    };
    assert!(err.to_string().contains("File too large"), "{err}");
    prlimit("unlimited:unlimited");
    std::thread::sleep(REOPEN_EVERY + std::time::Duration::from_millis(200));
    let after = l
        .register(new_household("SOC-01", "After the disk had room"))
        .expect("the same store writes again once there is room");
    written.push(after);
    for id in &written {
        l.household(*id).expect("every acknowledged write kept");
    }
    println!("CHILD OK {}", written.len());
}

#[test]
fn a_store_writes_again_once_the_disk_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .args(["-c", "trap '' XFSZ; exec \"$@\"", "sh"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_full_disk", "--ignored", "--nocapture"])
        .env("RELAIS_FULL_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
