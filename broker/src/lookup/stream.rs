//! The streamed lookup: each source's update as its answer lands, then the whole answer.
//!
//! One state machine, in the core, for every face that streams.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::time::Instant;

use super::Broker;
use super::admission::Slot;
use super::answer::{SourceUpdate, StreamEvent};
use crate::access::Caller;
use crate::error::LookupError;
use crate::fanout::Answer;
use crate::flight::{Flight, Progress};
use crate::validate::LookupRequest;

/// A streamed lookup's events. A mid-stream error (the relationship refused at the end, the audit
/// trail unavailable) is the last item.
pub type LookupStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, LookupError>> + Send>>;

/// Everything the live stream carries between polls.
struct Live {
    /// Keeps this stream counted among lookups in flight until it ends.
    _slot: Arc<Slot>,
    broker: Arc<Broker>,
    request: LookupRequest,
    caller: Caller,
    flight: Arc<Flight>,
    rx: tokio::sync::watch::Receiver<Progress>,
    deadline: Instant,
    /// Answers already taken from the flight's progress.
    seen: usize,
    /// The relationship is established: updates may flow (once the release is audited).
    released: bool,
    /// The release was written to the audit trail.
    audited: bool,
    /// Answers waiting for the release.
    held: Vec<Arc<Answer>>,
    pending: VecDeque<Result<StreamEvent, LookupError>>,
    /// Our deadline passed, or the flight is gone: finish with what arrived.
    expired: bool,
    finished: bool,
}

/// Source updates as the flight's answers land, then the final answer at completion or at our
/// deadline, whichever is first. Every source gets exactly one update: those that had not
/// answered by our deadline get one with their TIMEOUT status just before the final answer.
///
/// Updates are held back until the legitimate relationship is established (emergency access, a
/// trusted assertion, or an answer from the requester's own organisation); if it never is, the
/// stream ends with the denial and nothing was disclosed.
pub(super) fn live(
    broker: Arc<Broker>,
    request: LookupRequest,
    caller: Caller,
    flight: Arc<Flight>,
    deadline: Instant,
    slot: Arc<Slot>,
) -> LookupStream {
    let released = broker.released_by(&request, &caller, None);
    let state = Live {
        _slot: slot,
        rx: flight.subscribe(),
        broker,
        request,
        caller,
        flight,
        deadline,
        seen: 0,
        released,
        audited: false,
        held: Vec::new(),
        pending: VecDeque::new(),
        expired: false,
        finished: false,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((e, s));
            }
            if s.finished {
                return None;
            }
            s.take_progress().await;
            if !s.pending.is_empty() || s.finished {
                continue;
            }
            match tokio::time::timeout_at(s.deadline, s.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => s.expired = true,
            }
        }
    }))
}

impl Live {
    /// Takes what the flight has published since the last look, and queues what may leave.
    async fn take_progress(&mut self) {
        // The watch guard must not live across an await: copy out what is needed.
        let (new_answers, done) = {
            let progress = self.rx.borrow_and_update();
            let new: Vec<Arc<Answer>> = progress.answers.iter().skip(self.seen).cloned().collect();
            self.seen = progress.answers.len();
            let done = (progress.merged.is_some() || self.expired).then(|| {
                (
                    self.flight.merge_so_far(&progress),
                    progress.answers.clone(),
                )
            });
            (new, done)
        };
        for answer in new_answers {
            if !self.released
                && self
                    .broker
                    .released_by(&self.request, &self.caller, Some(&answer))
            {
                self.released = true;
            }
            self.held.push(answer);
        }
        if self.released && !self.audited && !self.held.is_empty() {
            // Nothing leaves before the audit trail says who is looking.
            if let Err(e) = self.broker.audit_release(&self.request, &self.caller).await {
                self.pending.push_back(Err(e));
                self.finished = true;
                return;
            }
            self.audited = true;
        }
        if self.audited {
            self.release_held();
        }
        let Some((merged, progress_answers)) = done else {
            return;
        };
        self.finished = true;
        match self
            .broker
            .disclose(&self.request, &self.caller, &merged, None)
            .await
        {
            Ok(answer) => {
                self.release_held();
                // Sources that never answered get their TIMEOUT update, as far as this
                // requester may see them (the final statuses are filtered).
                let answered: Vec<&str> = progress_answers
                    .iter()
                    .map(|a| a.status.source_id.as_str())
                    .collect();
                for status in &answer.sources {
                    if !answered.contains(&status.source_id.as_str()) {
                        self.pending.push_back(Ok(StreamEvent::Source(SourceUpdate {
                            status: status.clone(),
                            contribution: None,
                        })));
                    }
                }
                self.pending.push_back(Ok(StreamEvent::Complete(answer)));
            }
            Err(e) => self.pending.push_back(Err(e)),
        }
    }

    fn release_held(&mut self) {
        for answer in self.held.drain(..) {
            if let Some(update) = self.broker.source_update(&self.request, &answer) {
                self.pending.push_back(Ok(StreamEvent::Source(update)));
            }
        }
    }
}
