//! A [`Learner`] on its own thread: examples and update requests are queued and return at
//! once, updates run between (and beside) the requests that sessions of the same model
//! serve, and each kept update publishes the new adapter of record for sessions to swap in
//! (`Session::replace_adapter`). The GPU work of training and of generation interleaves
//! on the device's queue; neither waits for the other to finish.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::adapters::LoraAdapter;
use crate::error::{Error, Result};
use crate::learn::learner::{Learner, UpdateReport};
use crate::train::Example;

enum Msg {
    Add(Vec<Example>),
    Update,
    Stop,
}

#[derive(Default)]
struct State {
    /// Messages sent and not yet handled.
    queued: usize,
    /// The adapter of record after the last kept update, and how many have been published.
    adapter: Option<Arc<LoraAdapter>>,
    published: u64,
    /// What happened: update reports, or the errors of adds and updates.
    events: Vec<std::result::Result<UpdateReport, String>>,
}

struct Shared {
    state: Mutex<State>,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic on the learner thread cannot leave State half-written (every change is
        // one assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A learner running on a background thread.
pub struct BackgroundLearner {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Learner>>,
}

impl BackgroundLearner {
    /// Moves `learner` to a new thread.
    pub fn spawn(learner: Learner) -> Result<BackgroundLearner> {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ember-learner".into())
            .spawn(move || run(learner, rx, s))
            .map_err(|e| Error::Internal(format!("learner thread: {e}")))?;
        Ok(BackgroundLearner {
            tx,
            shared,
            thread: Some(thread),
        })
    }

    fn send(&self, m: Msg) -> Result<()> {
        self.shared.lock().queued += 1;
        self.tx.send(m).map_err(|_| {
            self.shared.lock().queued -= 1;
            Error::Internal("the learner thread has stopped".into())
        })
    }

    /// Queues examples (an update runs when the learner's policy says so). Errors (a bad
    /// example) show up in [`BackgroundLearner::events`].
    pub fn add(&self, examples: Vec<Example>) -> Result<()> {
        self.send(Msg::Add(examples))
    }

    /// Queues an update of the pending examples.
    pub fn request_update(&self) -> Result<()> {
        self.send(Msg::Update)
    }

    /// Whether queued work is not finished yet.
    pub fn busy(&self) -> bool {
        self.shared.lock().queued > 0
    }

    /// Blocks until every queued message is handled.
    pub fn wait_idle(&self) {
        let mut s = self.shared.lock();
        while s.queued > 0 {
            s = self.shared.idle.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The adapter of record after the last kept update (None before the first), with how
    /// many have been published so far (it grows by one per kept update).
    pub fn adapter(&self) -> (Option<Arc<LoraAdapter>>, u64) {
        let s = self.shared.lock();
        (s.adapter.clone(), s.published)
    }

    /// Takes the reports and errors since the last call.
    pub fn events(&self) -> Vec<std::result::Result<UpdateReport, String>> {
        std::mem::take(&mut self.shared.lock().events)
    }

    /// Finishes the queued work, stops the thread and returns the learner.
    pub fn stop(mut self) -> Result<Learner> {
        self.send(Msg::Stop)?;
        self.join()
    }

    fn join(&mut self) -> Result<Learner> {
        let t = self
            .thread
            .take()
            .ok_or_else(|| Error::Internal("the learner thread was already joined".into()))?;
        t.join()
            .map_err(|_| Error::Internal("the learner thread panicked".into()))
    }
}

impl Drop for BackgroundLearner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.tx.send(Msg::Stop);
            let _ = self.join();
        }
    }
}

fn run(mut learner: Learner, rx: Receiver<Msg>, shared: Arc<Shared>) -> Learner {
    for m in rx {
        let stop = matches!(m, Msg::Stop);
        let outcome = match m {
            Msg::Add(ex) => learner.add(&ex).map(|r| r.into_iter().collect::<Vec<_>>()),
            Msg::Update => learner.update().map(|r| vec![r]),
            Msg::Stop => Ok(Vec::new()),
        };
        let published = match &outcome {
            Ok(reports) if reports.iter().any(|r| r.kept) => learner.adapter().ok().map(Arc::new),
            _ => None,
        };
        let mut s = shared.lock();
        match outcome {
            Ok(reports) => s.events.extend(reports.into_iter().map(Ok)),
            Err(e) => s.events.push(Err(e.to_string())),
        }
        if let Some(a) = published {
            s.adapter = Some(a);
            s.published += 1;
        }
        s.queued -= 1;
        shared.idle.notify_all();
        drop(s);
        if stop {
            break;
        }
    }
    learner
}
