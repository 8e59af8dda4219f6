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

use std::panic::{catch_unwind, AssertUnwindSafe};

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

fn prepare(job: Job<'_>) -> Prepared {
    let mut candidate = job.base.map(Automerge::fork).unwrap_or_default();
    let before = candidate.get_heads();
    let mut state = job.state.clone();
    let refused = apply_message(&mut candidate, &mut state, job.message, job.id);
    let info = (refused.is_none() && candidate.get_heads() != before)
        .then(|| document::describe(&candidate, &mut |_| None));
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
        return jobs.into_iter().map(prepare).collect();
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
            .map(|share| scope.spawn(move || share.into_iter().map(prepare).collect::<Vec<_>>()))
            .collect();
        let mut done: Vec<Prepared> = mine.into_iter().map(prepare).collect();
        for handle in others {
            // `prepare` catches automerge's panics; a panic here would be the hub's own bug,
            // and the documents it held are simply applied again in order.
            if let Ok(more) = handle.join() {
                done.extend(more);
            }
        }
        done
    })
}
