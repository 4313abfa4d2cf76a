//! The versioned cluster state: each change a source reports becomes a new generation.
//!
//! Version numbers count up from 1 per controller start; the epoch (random per start) tells
//! nodes apart which controller instance the numbers belong to. The last few generations
//! are kept so a reconnecting node can be sent a delta instead of a snapshot.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::Version;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::cluster::ClusterState;

/// How many generations a node can fall behind and still resume with a delta.
const HISTORY: usize = 64;

#[derive(Debug, Clone)]
pub struct Generation {
    pub number: u64,
    pub state: Arc<ClusterState>,
}

pub struct Store {
    epoch: String,
    history: Mutex<VecDeque<Generation>>,
    latest: watch::Sender<Option<Generation>>,
}

/// A fresh epoch: 64 random bits in hex, so two controller starts never share one.
pub fn random_epoch() -> Option<String> {
    let mut bytes = [0u8; 8];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Store {
    pub fn new(epoch: String) -> Self {
        Store {
            epoch,
            history: Mutex::default(),
            latest: watch::Sender::new(None),
        }
    }

    pub fn version(&self, number: u64) -> Version {
        Version {
            epoch: self.epoch.clone(),
            number,
        }
    }

    /// Records a new state; returns its number, or `None` when nothing changed.
    pub fn publish(&self, state: ClusterState) -> Option<u64> {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let last = history.back();
        if last.is_some_and(|g| *g.state == state) {
            return None;
        }
        let generation = Generation {
            number: last.map_or(1, |g| g.number + 1),
            state: Arc::new(state),
        };
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(generation.clone());
        let number = generation.number;
        self.latest.send_replace(Some(generation));
        Some(number)
    }

    /// The latest generation; `None` until the source has loaded the cluster once.
    pub fn latest(&self) -> Option<Generation> {
        self.latest.borrow().clone()
    }

    /// Notified on every new generation.
    pub fn subscribe(&self) -> watch::Receiver<Option<Generation>> {
        self.latest.subscribe()
    }

    /// The state a node at `version` holds its view of, if this instance still has it.
    pub fn state_at(&self, version: &Version) -> Option<Arc<ClusterState>> {
        if version.epoch != self.epoch {
            return None;
        }
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        history
            .iter()
            .find(|g| g.number == version.number)
            .map(|g| g.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Namespace;

    fn state(ns: &str) -> ClusterState {
        let mut s = ClusterState::default();
        s.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: Default::default(),
            },
        );
        s
    }

    #[test]
    fn numbers_count_changes_only() {
        let store = Store::new("e".into());
        assert!(store.latest().is_none());
        assert_eq!(store.publish(state("a")), Some(1));
        assert_eq!(store.publish(state("a")), None);
        assert_eq!(store.publish(state("b")), Some(2));
        assert_eq!(store.latest().unwrap().number, 2);
    }

    #[test]
    fn history_is_bounded_and_per_epoch() {
        let store = Store::new("e".into());
        for i in 0..HISTORY + 5 {
            store.publish(state(&i.to_string()));
        }
        assert!(store.state_at(&store.version(1)).is_none());
        assert!(store.state_at(&store.version(5)).is_none());
        assert_eq!(*store.state_at(&store.version(6)).unwrap(), state("5"));
        let newest = (HISTORY + 5) as u64;
        assert!(store.state_at(&store.version(newest)).is_some());
        assert!(store.state_at(&store.version(newest + 1)).is_none());
        let other = Version {
            epoch: "other".into(),
            number: newest,
        };
        assert!(store.state_at(&other).is_none());
    }
}
