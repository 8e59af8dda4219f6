//! Applying the documents of one `relais-sync-batch` on several cores.
//!
//! A tablet pushes up to [`BATCH_DOCS`](super::hub::BATCH_DOCS) documents in one frame, and a
//! fresh tablet downloads its site the same way. Per document, most of the hub's time is
//! automerge applying the changes and the record being read for access control (about two
//! thirds of the server's engine thread during a push, in `perf`), and both depend on that
//! document alone. So the hub first applies every document of a batch to a fork, in
//! parallel, then walks the batch in order as before. A document whose document and sync
//! state are still exactly those the fork started from takes the prepared result; any other
//! is applied again where it stands. The parallel step only saves time: what the hub decides
//! and sends is what it would without it.
//!
//! The engine hands the hub every frame of a round at once ([`super::hub::Hub::receive_all`]).
//! Then the new documents of all of them are applied ahead by [`ahead`], on helper threads
//! that work through the round while the hub walks it frame by frame: the walk (access
//! checks, replies, the store's writes) no longer waits for a batch's documents to be
//! applied, nor leaves the other core idle while it runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};

use crate::document::{self, DocInfo};
use crate::DocumentId;

/// Documents in a batch below which applying them one by one costs less than starting
/// threads (a thread start is tens of microseconds, a household a few hundred).
pub(crate) const PARALLEL_MIN: usize = 4;

/// One document of a batch to apply ahead.
pub(crate) struct Job<'a> {
    pub id: DocumentId,
    /// The document as the hub holds it; `None` for one it does not have yet.
    pub base: Option<&'a Automerge>,
    /// The peer's sync state for it, as the hub would use it.
    pub state: sync::State,
    pub message: sync::Message,
}

/// A document applied ahead, to be used only if nothing it started from has changed.
pub(crate) struct Prepared {
    pub id: DocumentId,
    /// Heads of the document it was applied to.
    pub before: Vec<ChangeHash>,
    /// The sync state it started from.
    pub state_in: sync::State,
    /// The sync state after the message.
    pub state_out: sync::State,
    /// The fork the message was applied to.
    pub candidate: Automerge,
    /// Why automerge refused the message, if it did.
    pub refused: Option<String>,
    /// What the document says about itself once changed (regions not filled in), when the
    /// message moved its heads.
    pub info: Option<DocInfo>,
}

/// The most probes per hash a peer's bloom filter may ask for. Automerge and its JS
/// binding use 7; each probe is work for every change the reply considers.
const MAX_BLOOM_PROBES: u32 = 32;

/// Decodes a peer's automerge sync message, refusing one whose bloom filters automerge
/// would choke on when it next replies: entries but no bits (a division by zero, a panic
/// in 0.12) or an absurd number of probes (a vector of that many is allocated and filled
/// for each hash checked: minutes of CPU, or an abort no `catch_unwind` survives).
pub(crate) fn decode_sync(data: &[u8]) -> Result<sync::Message, String> {
    let message = sync::Message::decode(data).map_err(|e| e.to_string())?;
    for have in &message.have {
        let bytes = have.bloom.to_bytes();
        let mut rest = bytes.as_slice();
        if rest.is_empty() {
            continue;
        }
        let mut field = || leb128_u32(&mut rest).ok_or("a bloom filter with a bad header");
        let (entries, bits_per_entry, probes) = (field()?, field()?, field()?);
        if entries > 0 && bits_per_entry == 0 {
            return Err("a bloom filter with entries but no bits".into());
        }
        if probes > MAX_BLOOM_PROBES {
            return Err(format!(
                "a bloom filter of {probes} probes per hash (at most {MAX_BLOOM_PROBES})"
            ));
        }
    }
    Ok(message)
}

/// Reads an unsigned LEB128 number that fits in 32 bits from the front of `bytes`.
fn leb128_u32(bytes: &mut &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(5) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return u32::try_from(value).ok();
        }
    }
    None
}

/// Applies a sync message to a document, as the hub does: `Some(reason)` when automerge
/// refuses it or panics on it (a malformed change must cost the peer its connection, not
/// the server its thread).
pub(crate) fn apply_message(
    doc: &mut Automerge,
    state: &mut sync::State,
    message: sync::Message,
    id: DocumentId,
) -> Option<String> {
    // A first push from stored bytes (`Hub::offer_stored`) carries changes and neither asks
    // for nor summarises anything. Left as it came, the empty `have` would make every later
    // message to that peer about this document carry heads only, a round trip more; but a
    // peer holds the heads it reports, so once they are all here they are its `have`.
    let first_push = (message.have.is_empty()
        && message.need.is_empty()
        && !message.changes.is_empty()
        && !message.heads.is_empty())
    .then(|| message.heads.clone());
    match catch_unwind(AssertUnwindSafe(|| {
        doc.receive_sync_message(state, message)
    })) {
        Ok(Ok(())) => {
            if let Some(heads) = first_push {
                if document::has_changes(doc, &heads) {
                    state.their_have = Some(vec![sync::Have {
                        last_sync: heads,
                        bloom: Default::default(),
                    }]);
                }
            }
            None
        }
        Ok(Err(e)) => Some(format!(
            "document {id}: automerge refused the sync message: {e}"
        )),
        Err(_) => Some(format!(
            "document {id}: automerge panicked on the sync message"
        )),
    }
}

/// Describes a document that changes just made (see [`document::describe`]), or says why
/// not if reading it panics: content automerge accepted but cannot read back must cost the
/// peer that sent it its connection, not the hub its thread (and with it every device's sync).
pub(crate) fn describe(id: DocumentId, doc: &Automerge) -> Result<DocInfo, String> {
    catch_unwind(AssertUnwindSafe(|| {
        #[cfg(test)]
        if id == DESCRIBE_PANICS_IN_TESTS {
            panic!("a test's panic while describing");
        }
        document::describe(doc, &mut |_| None)
    }))
    .map_err(|_| format!("document {id}: reading it back after its changes panicked"))
}

/// A document whose describing panics in a test, on either path (ahead or in order).
#[cfg(test)]
pub(crate) const DESCRIBE_PANICS_IN_TESTS: DocumentId = DocumentId::from_bytes([0xED; 16]);

/// A document whose replies panic in a test (see `Hub::reply`).
#[cfg(test)]
pub(crate) const REPLY_PANICS_IN_TESTS: DocumentId = DocumentId::from_bytes([0xEC; 16]);

/// A document whose applying panics in a test (see `tests`): the panic must cost no other
/// document its result, whichever thread meets it.
#[cfg(test)]
const PANICS_IN_TESTS: DocumentId = DocumentId::from_bytes([0xEE; 16]);

/// [`prepare_one`], or nothing if it panics: the document is then applied in order, as one
/// not applied ahead, and no other document's result is lost with it.
fn prepare(job: Job<'_>) -> Option<Prepared> {
    catch_unwind(AssertUnwindSafe(|| prepare_one(job))).ok()
}

fn prepare_one(job: Job<'_>) -> Prepared {
    #[cfg(test)]
    if job.id == PANICS_IN_TESTS {
        panic!("a test's panic while applying ahead");
    }
    let mut candidate = job.base.map(Automerge::fork).unwrap_or_default();
    let before = candidate.get_heads();
    let mut state = job.state.clone();
    let mut refused = apply_message(&mut candidate, &mut state, job.message, job.id);
    let mut info = None;
    if refused.is_none() && candidate.get_heads() != before {
        match describe(job.id, &candidate) {
            Ok(i) => info = Some(i),
            Err(reason) => refused = Some(reason),
        }
    }
    Prepared {
        id: job.id,
        before,
        state_in: job.state,
        state_out: state,
        candidate,
        refused,
        info,
    }
}

/// Applies every job, on up to `workers` threads (the calling one among them).
pub(crate) fn prepare_all(jobs: Vec<Job<'_>>, workers: usize) -> Vec<Prepared> {
    let workers = workers.min(jobs.len());
    if workers < 2 || jobs.len() < PARALLEL_MIN {
        return jobs.into_iter().filter_map(prepare).collect();
    }
    // Households cost about the same each, so dealing them out in turn balances the threads.
    let mut shares: Vec<Vec<Job<'_>>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        shares[i % workers].push(job);
    }
    let mine = shares.pop().unwrap_or_default();
    std::thread::scope(|scope| {
        let others: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || share.into_iter().filter_map(prepare).collect::<Vec<_>>())
            })
            .collect();
        let mut done: Vec<Prepared> = mine.into_iter().filter_map(prepare).collect();
        for handle in others {
            // `prepare` catches panics; one here would be the hub's own bug, and the
            // documents it held are simply applied again in order.
            if let Ok(more) = handle.join() {
                done.extend(more);
            }
        }
        done
    })
}

/// A round's jobs, frame after frame, for threads to take one at a time in order.
struct Queue {
    jobs: Vec<Mutex<Option<Job<'static>>>>,
    next: AtomicUsize,
    /// Where each frame's jobs end in `jobs`.
    ends: Vec<usize>,
}

impl Queue {
    fn new(frames: Vec<Vec<Job<'static>>>) -> Queue {
        let mut ends = Vec::with_capacity(frames.len());
        let mut jobs = Vec::new();
        for f in frames {
            jobs.extend(f.into_iter().map(|j| Mutex::new(Some(j))));
            ends.push(jobs.len());
        }
        Queue {
            jobs,
            next: AtomicUsize::new(0),
            ends,
        }
    }

    /// The next job not started and its place, or `None` once all are; the job is `None`
    /// where another thread had it already.
    fn claim(&self) -> Option<(usize, Option<Job<'static>>)> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = self.jobs.get(k)?;
        Some((k, slot.lock().ok().and_then(|mut j| j.take())))
    }

    /// The frame job `k` belongs to.
    fn frame_of(&self, k: usize) -> usize {
        self.ends.partition_point(|&end| end <= k)
    }
}

/// The documents of a round's frames, applied ahead while the hub handles the frames in
/// order: see [`ahead`].
pub(crate) struct Ahead<'a> {
    queue: &'a Queue,
    done: mpsc::Receiver<(usize, Option<Prepared>)>,
    slots: Vec<Option<Prepared>>,
    /// Jobs whose results have arrived (in `slots`) or that can no longer arrive.
    settled: Vec<bool>,
}

impl Ahead<'_> {
    /// The documents of frame `frame` applied, waiting for them (and applying others on this
    /// thread meanwhile) if need be. Empty for a frame without jobs; a job whose applying
    /// panicked is missing, to be applied in order as any other document.
    pub(crate) fn take(&mut self, frame: usize) -> Vec<Prepared> {
        let ends = &self.queue.ends;
        let Some(&end) = ends.get(frame) else {
            return Vec::new();
        };
        let start = if frame == 0 { 0 } else { ends[frame - 1] };
        while (start..end).any(|k| !self.settled[k]) {
            // Claim the next job not started: this frame's, or a later one while a helper
            // finishes one of this frame's.
            if let Some((k, job)) = self.queue.claim() {
                if let Some(job) = job {
                    self.slots[k] = prepare(job);
                }
                self.settled[k] = true;
                continue;
            }
            match self.done.recv() {
                Ok((k, p)) => {
                    self.slots[k] = p;
                    self.settled[k] = true;
                }
                // Every helper has stopped: nothing more arrives.
                Err(_) => self.settled.iter_mut().for_each(|s| *s = true),
            }
        }
        self.slots[start..end]
            .iter_mut()
            .filter_map(Option::take)
            .collect()
    }
}

/// Applies `frames[i]`'s jobs in order on `threads` threads (the calling one among them)
/// until `stop` says so, which each thread asks before each job: so it returns at most one
/// job's time after `stop` turns true. The result holds, for each frame, the documents
/// applied (a frame cut short has some of its documents, later frames none); a job not
/// started, or whose applying panicked, is simply missing.
pub(crate) fn apply_until(
    frames: Vec<Vec<Job<'static>>>,
    threads: usize,
    stop: &(dyn Fn() -> bool + Sync),
) -> Vec<Vec<Prepared>> {
    let n_frames = frames.len();
    let queue = Queue::new(frames);
    let work = || {
        let mut done = Vec::new();
        while !stop() {
            let Some((k, job)) = queue.claim() else { break };
            if let Some(p) = job.and_then(prepare) {
                done.push((queue.frame_of(k), p));
            }
        }
        done
    };
    let mut by_frame: Vec<Vec<Prepared>> = (0..n_frames).map(|_| Vec::new()).collect();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads.min(queue.jobs.len()))
            .map(|_| scope.spawn(work))
            .collect();
        let mut all = work();
        for h in helpers {
            // As in `ahead`: `prepare` catches panics, so this is the hub's own bug, and
            // only what that helper held is lost.
            if let Ok(more) = h.join() {
                all.extend(more);
            }
        }
        for (f, p) in all {
            by_frame[f].push(p);
        }
    });
    by_frame
}

/// Applies `frames[i]`'s jobs for every frame of a round on `workers - 1` helper threads
/// and the calling one, while `walk` handles the frames in order and takes each frame's
/// results with [`Ahead::take`]. The helpers take the jobs in order, so the frames the walk
/// needs first are done first.
pub(crate) fn ahead<R>(
    frames: Vec<Vec<Job<'static>>>,
    workers: usize,
    walk: impl FnOnce(&mut Ahead<'_>) -> R,
) -> R {
    let queue = Queue::new(frames);
    let n = queue.jobs.len();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let mut helpers = Vec::new();
        for _ in 1..workers.min(n) {
            let (tx, queue) = (tx.clone(), &queue);
            helpers.push(scope.spawn(move || {
                while let Some((k, job)) = queue.claim() {
                    if let Some(job) = job {
                        if tx.send((k, prepare(job))).is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        // Only the helpers send: once they stop, the walk's `recv` returns.
        drop(tx);
        let mut state = Ahead {
            queue: &queue,
            done: rx,
            slots: (0..n).map(|_| None).collect(),
            settled: vec![false; n],
        };
        let r = walk(&mut state);
        // Jobs of frames the walk never took are not started now.
        queue.next.fetch_max(n, Ordering::Relaxed);
        for h in helpers {
            // Joined here, not by the scope, which would pass a helper's panic on: as in
            // `prepare_all`, what a helper held is simply applied in order.
            let _ = h.join();
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    /// A sync message carrying the whole of a new one-change document, and its heads.
    fn carrying(key: &str) -> (sync::Message, Vec<ChangeHash>) {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, key, 1).unwrap();
        tx.commit();
        let (mut mine, mut theirs) = (sync::State::new(), sync::State::new());
        let mut empty = Automerge::new();
        let first = doc.generate_sync_message(&mut mine).unwrap();
        empty.receive_sync_message(&mut theirs, first).unwrap();
        let ask = empty.generate_sync_message(&mut theirs).unwrap();
        doc.receive_sync_message(&mut mine, ask).unwrap();
        let message = doc.generate_sync_message(&mut mine).unwrap();
        assert!(!message.changes.is_empty());
        (message, doc.get_heads())
    }

    /// A message from a peer holding one change, encoded, with `bloom` (header and bits, as
    /// on the wire) as its filter.
    fn with_bloom(bloom: &[u8]) -> Vec<u8> {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        let mut message = doc.generate_sync_message(&mut sync::State::new()).unwrap();
        message.have[0].bloom = sync::BloomFilter::try_from(bloom).unwrap();
        message.encode()
    }

    #[test]
    fn bloom_filters_automerge_would_choke_on_are_refused() {
        // A sound filter of one entry: 10 bits per entry, 7 probes, two bytes of bits.
        let sound = with_bloom(&[1, 10, 7, 0xff, 0x03]);
        assert_eq!(decode_sync(&sound).unwrap().have.len(), 1);
        // Entries but no bits: automerge 0.12 divides by zero when it replies.
        let no_bits = with_bloom(&[1, 0, 7]);
        let e = decode_sync(&no_bits).unwrap_err();
        assert!(e.contains("no bits"), "{e}");
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "mine", 1).unwrap();
        tx.commit();
        let mut state = sync::State::new();
        let taken = sync::Message::decode(&no_bits).unwrap();
        doc.receive_sync_message(&mut state, taken).unwrap();
        let replying = catch_unwind(AssertUnwindSafe(|| doc.generate_sync_message(&mut state)));
        assert!(replying.is_err(), "the panic this check keeps out");
        // Four billion probes, allocated before the first.
        let probes = with_bloom(&[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0x03]);
        let e = decode_sync(&probes).unwrap_err();
        assert!(e.contains("4294967295 probes"), "{e}");
    }

    fn job(key: &str, n: u8) -> (Job<'static>, Vec<ChangeHash>) {
        let (message, heads) = carrying(key);
        let job = Job {
            id: DocumentId::from_bytes([n; 16]),
            base: None,
            state: sync::State::new(),
            message,
        };
        (job, heads)
    }

    #[test]
    fn each_frame_gets_its_own_documents_whatever_the_threads() {
        let sizes = [2usize, 0, 1, 3, 0];
        for workers in [1, 2, 3, 8] {
            let mut frames = Vec::new();
            let mut expected = Vec::new();
            let mut n = 0u8;
            for size in sizes {
                let mut jobs = Vec::new();
                let mut want = Vec::new();
                for _ in 0..size {
                    n += 1;
                    let (j, heads) = job(&format!("k{n}"), n);
                    want.push((j.id, heads));
                    jobs.push(j);
                }
                frames.push(jobs);
                expected.push(want);
            }
            let got = ahead(frames, workers, |a| {
                // The last frame first: a walk takes them in order, but nothing depends on it.
                let last = a.take(3);
                let mut all: Vec<_> = (0..sizes.len()).map(|i| a.take(i)).collect();
                all[3] = last;
                all.push(a.take(sizes.len()));
                all
            });
            assert!(got[sizes.len()].is_empty(), "no such frame");
            for (frame, (prepared, want)) in got.iter().zip(&expected).enumerate() {
                let seen: Vec<_> = prepared
                    .iter()
                    .map(|p| (p.id, p.candidate.get_heads()))
                    .collect();
                assert_eq!(&seen, want, "frame {frame}, {workers} workers");
                assert!(prepared
                    .iter()
                    .all(|p| p.refused.is_none() && p.before.is_empty()));
            }
        }
    }

    /// Three frames of `n` documents each, one of them the one whose applying panics.
    fn frames_with_a_panic(n: u8, at: (usize, usize)) -> (Vec<Vec<Job<'static>>>, Vec<DocumentId>) {
        let mut frames = Vec::new();
        let mut others = Vec::new();
        for f in 0..3 {
            let mut jobs = Vec::new();
            for i in 0..n as usize {
                let (mut j, _) = job(&format!("k{f}.{i}"), (f * n as usize + i + 1) as u8);
                if (f, i) == at {
                    j.id = PANICS_IN_TESTS;
                } else {
                    others.push(j.id);
                }
                jobs.push(j);
            }
            frames.push(jobs);
        }
        (frames, others)
    }

    #[test]
    fn a_document_whose_applying_panics_costs_no_other_its_result() {
        // First, inside and last in the round, on one thread and on several: whichever thread
        // meets the panic (a helper, or the caller), the others' results all come back.
        for at in [(0, 0), (1, 2), (2, 4)] {
            for threads in [1, 2, 3] {
                let ids = |ps: &[Prepared]| ps.iter().map(|p| p.id).collect::<Vec<_>>();
                let (frames, others) = frames_with_a_panic(5, at);
                let got: Vec<_> = ahead(frames, threads, |a| {
                    (0..3).flat_map(|f| ids(&a.take(f))).collect()
                });
                assert_eq!(got, others, "ahead, panic at {at:?}, {threads} threads");

                let (frames, others) = frames_with_a_panic(5, at);
                let mut got: Vec<_> = apply_until(frames, threads, &|| false)
                    .iter()
                    .flat_map(|f| ids(f))
                    .collect();
                got.sort();
                let mut want = others.clone();
                want.sort();
                assert_eq!(got, want, "apply_until, panic at {at:?}, {threads} threads");

                let (frames, _) = frames_with_a_panic(5, at);
                let mut got = ids(&prepare_all(
                    frames.into_iter().flatten().collect(),
                    threads,
                ));
                got.sort();
                assert_eq!(got, want, "prepare_all, panic at {at:?}, {threads} threads");
            }
        }
    }

    #[test]
    fn a_frame_taken_twice_is_empty_the_second_time() {
        let (a, _) = job("a", 1);
        let (b, _) = job("b", 2);
        let (first, again) = ahead(vec![vec![a, b]], 2, |w| (w.take(0), w.take(0)));
        assert_eq!(first.len(), 2);
        assert!(again.is_empty());
    }
}
