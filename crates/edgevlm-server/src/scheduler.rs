//! Continuous batching: one thread owns the model's work. Requests join between decode steps and
//! leave when they finish or their client goes away; every step decodes the next token of all
//! running answers in one pass ([`Engine::step_batch`]), and a joining request's prompt pass runs a
//! step at a time (a tile or a prompt chunk) between them, so a long image prompt does not stall the
//! others' streams.

use std::collections::VecDeque;

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use edgevlm::engine::{Generation, GenerationSettings, Piece, Poll, PreparedPrompt, Starting};
use edgevlm::openai::FinishReason;
use edgevlm::{Engine, Timings};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;

/// What a request's handler hears from the scheduler.
#[derive(Debug)]
pub enum Event {
    /// More answer text.
    Piece(Piece),
    /// The answer is complete.
    Done {
        finish: FinishReason,
        completion_tokens: usize,
        timings: Box<Timings>,
    },
    Failed(ApiError),
}

/// A prepared request waiting for a slot.
pub struct Job {
    pub prepared: PreparedPrompt,
    pub settings: GenerationSettings,
    pub events: UnboundedSender<Event>,
}

/// Where requests enter: a bounded queue in front of `parallel` running answers.
#[derive(Clone)]
pub struct Scheduler {
    jobs: mpsc::Sender<Job>,
    /// Requests queued or running.
    load: Arc<AtomicUsize>,
    parallel: usize,
    max_queue: usize,
}

impl Scheduler {
    /// Start the scheduling thread for `engine`; it ends once every [`Scheduler`] clone is dropped
    /// and the requests it holds are answered.
    pub fn start(engine: Arc<Engine>, parallel: usize, max_queue: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let load = Arc::new(AtomicUsize::new(0));
        let counter = load.clone();
        std::thread::Builder::new()
            .name("edgevlm-scheduler".into())
            .spawn(move || run(&engine, rx, parallel.max(1), &counter))
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("cannot start the scheduler thread: {e}"));
        Self {
            jobs: tx,
            load,
            parallel: parallel.max(1),
            max_queue,
        }
    }

    /// Take a place for a request before preparing it (its images decoded, its prompt tokenized), so
    /// that no more than `parallel + max_queue` requests are ever prepared or held at once; refused
    /// with 429 beyond. The place is given back if the ticket is dropped unused.
    pub fn reserve(&self) -> Result<Ticket, ApiError> {
        let limit = self.parallel + self.max_queue;
        let admitted = self
            .load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return Err(ApiError::queue_full(self.parallel, self.max_queue));
        }
        Ok(Ticket {
            load: Some(self.load.clone()),
        })
    }

    /// Queue a prepared job in the place `ticket` holds.
    pub fn submit(&self, mut ticket: Ticket, job: Job) -> Result<(), ApiError> {
        // From here the scheduler gives the place back when the job ends.
        ticket.load = None;
        self.jobs.send(job).map_err(|_| {
            self.load.fetch_sub(1, Ordering::SeqCst);
            ApiError::unavailable("the server is shutting down", "shutting_down")
        })
    }

    /// Requests queued or running.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }
}

/// A place taken in the queue ([`Scheduler::reserve`]).
pub struct Ticket {
    load: Option<Arc<AtomicUsize>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(load) = &self.load {
            load.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One running request.
struct Running<'e> {
    events: UnboundedSender<Event>,
    state: State<'e>,
}

enum State<'e> {
    Starting(Box<Starting<'e>>),
    Generating(Box<Generation<'e>>),
}

fn run(engine: &Engine, jobs: mpsc::Receiver<Job>, parallel: usize, load: &AtomicUsize) {
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        // Take what has arrived; sleep only when there is nothing to do.
        if running.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Requests whose clients left while queued are dropped without running.
        waiting.retain(|j| {
            let gone = j.events.is_closed();
            if gone {
                load.fetch_sub(1, Ordering::SeqCst);
            }
            !gone
        });
        while running.len() < parallel {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            match engine.begin(job.prepared, &job.settings) {
                Ok(s) => running.push(Running {
                    events: job.events,
                    state: State::Starting(Box::new(s)),
                }),
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                    load.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        step(engine, &mut running, load);
    }
}

/// Run a generating answer up to its next model step, sending the text it shows: `None` while it
/// goes on, `Some(event)` once it ends (`Some(None)`: its client went away).
fn poll_one(r: &mut Running<'_>) -> Option<Option<Event>> {
    let State::Generating(g) = &mut r.state else {
        return None;
    };
    loop {
        match g.poll() {
            Ok(Poll::Piece(p)) => {
                if r.events.send(Event::Piece(p)).is_err() {
                    return Some(None);
                }
            }
            Ok(Poll::NeedsStep) => return None,
            Ok(Poll::Done) => {
                return Some(Some(Event::Done {
                    finish: g.finish_reason().unwrap_or(FinishReason::Length),
                    completion_tokens: g.tokens().len(),
                    timings: Box::new(g.timings().clone()),
                }))
            }
            Err(e) => return Some(Some(Event::Failed(e.into()))),
        }
    }
}

/// One round: a step of the oldest prompt pass, then everything generating up to its next token.
fn step<'e>(engine: &'e Engine, running: &mut Vec<Running<'e>>, load: &AtomicUsize) {
    let finished = |r: &Running<'_>, load: &AtomicUsize, event: Option<Event>| {
        if let Some(e) = event {
            let _ = r.events.send(e);
        }
        load.fetch_sub(1, Ordering::SeqCst);
    };
    // A client that went away frees its slot here, within one step.
    running.retain(|r| {
        let gone = r.events.is_closed();
        if gone {
            finished(r, load, None);
        }
        !gone
    });
    // The oldest prompt pass advances by one step (one tile or one chunk).
    if let Some(i) = running
        .iter()
        .position(|r| matches!(r.state, State::Starting(_)))
    {
        let advanced = match &mut running[i].state {
            State::Starting(s) => s.advance(),
            State::Generating(_) => Ok(false),
        };
        match advanced {
            Ok(false) => {}
            Ok(true) => {
                let Running { events, state } = running.remove(i);
                if let State::Starting(s) = state {
                    match s.finish() {
                        Ok(g) => running.insert(
                            i,
                            Running {
                                events,
                                state: State::Generating(Box::new(g)),
                            },
                        ),
                        Err(e) => {
                            let _ = events.send(Event::Failed(e.into()));
                            load.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            }
            Err(e) => {
                let r = running.remove(i);
                finished(&r, load, Some(Event::Failed(e.into())));
            }
        }
    }
    // Every generating answer runs up to the point where it needs the model: each samples from its
    // own logits, so they do it at once on the thread pool (a vocabulary-wide softmax per answer,
    // which one thread alone would do while the other cores wait).
    let outcomes: Vec<Option<Option<Event>>> = running.par_iter_mut().map(poll_one).collect();
    for (i, outcome) in outcomes.into_iter().enumerate().rev() {
        if let Some(event) = outcome {
            let r = running.remove(i);
            finished(&r, load, event);
        }
    }
    let mut batch: Vec<&mut Generation<'e>> = running
        .iter_mut()
        .filter_map(|r| match &mut r.state {
            State::Generating(g) => Some(&mut **g),
            State::Starting(_) => None,
        })
        .collect();
    if batch.is_empty() {
        return;
    }
    if let Err(e) = engine.step_batch(&mut batch) {
        // A failed pass leaves no answer usable: each learns why.
        tracing::error!("decode step failed: {e}");
        let err: ApiError = e.into();
        running.retain(|r| match r.state {
            State::Generating(_) => {
                finished(r, load, Some(Event::Failed(err.clone())));
                false
            }
            State::Starting(_) => true,
        });
    }
}
