//! Where cluster state comes from. A source publishes a complete [`ClusterState`] into the
//! store at start and after every change; the store turns changes into versions.
//!
//! [`ClusterState`]: crate::cluster::ClusterState

pub mod file;
pub mod kubernetes;
pub mod objects;

use std::future::Future;
use std::sync::Arc;

use crate::store::Store;

pub trait Source: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs until the source fails; a source that cannot go on returns its error.
    fn run(self, store: Arc<Store>) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
