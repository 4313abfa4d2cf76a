//! A reflector of converted objects: what kube-rs's `reflector::Store` does with watcher
//! events, but keeping each object in its mesh form (a few fields) instead of the whole API
//! object.
//!
//! The watcher's contract (kube-runtime `watcher::Event`), and what the mirror does:
//! - `Init` starts a (re)list — at start, after `410 Gone` (the resource version the watch
//!   resumed from is too old), after a watch that could not be resumed. The live contents are
//!   kept while the list comes in,
//! - `InitApply(obj)` is one listed object, buffered,
//! - `InitDone` ends the list: the buffer replaces the live contents in one step, so objects
//!   deleted while the watch was down disappear and none is ever missing halfway through,
//! - `Apply(obj)` / `Delete(obj)` are watch events, applied at once.
//!
//! So a relist never publishes a partial cluster, and a slow consumer loses nothing: the
//! watch is pulled, not pushed, and if the API server has compacted past where it is, the
//! answer is `410 Gone` and a relist.

use std::collections::BTreeMap;

use kube::runtime::watcher::Event;
use kube::ResourceExt;
use mesh_api::NamespacedName;

pub struct Mirror<V> {
    live: BTreeMap<NamespacedName, V>,
    listing: Option<BTreeMap<NamespacedName, V>>,
    synced: bool,
}

impl<V> Default for Mirror<V> {
    fn default() -> Self {
        Mirror {
            live: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

fn key<K: ResourceExt>(object: &K) -> NamespacedName {
    NamespacedName::new(object.namespace().unwrap_or_default(), object.name_any())
}

impl<V: PartialEq> Mirror<V> {
    /// Applies one watcher event; returns whether the live contents changed.
    pub fn apply<K: ResourceExt>(&mut self, event: Event<K>, convert: impl Fn(&K) -> V) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let value = convert(&object);
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&object), value);
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = !self.synced || listed != self.live;
                self.live = listed;
                self.synced = true;
                changed
            }
            Event::Apply(object) => {
                let value = convert(&object);
                let key = key(&object);
                if self.live.get(&key) == Some(&value) {
                    return false;
                }
                self.live.insert(key, value);
                true
            }
            Event::Delete(object) => self.live.remove(&key(&object)).is_some(),
        }
    }
}

impl<V> Mirror<V> {
    /// Whether a first list has completed.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NamespacedName, &V)> {
        self.live.iter()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn cm(name: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            data: Some([("v".to_owned(), value.to_owned())].into()),
            ..ConfigMap::default()
        }
    }

    fn value(c: &ConfigMap) -> String {
        c.data.as_ref().unwrap()["v"].clone()
    }

    fn contents(m: &Mirror<String>) -> Vec<(String, String)> {
        m.iter().map(|(k, v)| (k.name.clone(), v.clone())).collect()
    }

    #[test]
    fn relist_swaps_atomically_and_drops_the_missed_deletes() {
        let mut m = Mirror::default();
        assert!(!m.apply(Event::Init, value));
        assert!(!m.apply(Event::InitApply(cm("a", "1")), value));
        assert!(!m.synced());
        assert!(
            m.apply(Event::InitDone, value),
            "the first list publishes even when empty"
        );
        assert!(m.synced());
        assert!(m.apply(Event::Apply(cm("b", "1")), value));
        assert!(
            !m.apply(Event::Apply(cm("b", "1")), value),
            "same value: no change"
        );
        assert!(m.apply(Event::Apply(cm("b", "2")), value));

        // The watch broke (410 Gone); meanwhile "a" was deleted and "c" created.
        m.apply(Event::Init, value);
        m.apply(Event::InitApply(cm("b", "2")), value);
        assert_eq!(
            contents(&m),
            [("a".into(), "1".into()), ("b".into(), "2".into())],
            "kept while listing"
        );
        m.apply(Event::InitApply(cm("c", "1")), value);
        assert!(m.apply(Event::InitDone, value));
        assert_eq!(contents(&m), [("b".into(), "2".into()), ("c".into(), "1".into())]);

        // A relist that finds the same objects changes nothing.
        m.apply(Event::Init, value);
        m.apply(Event::InitApply(cm("b", "2")), value);
        m.apply(Event::InitApply(cm("c", "1")), value);
        assert!(!m.apply(Event::InitDone, value));

        assert!(m.apply(Event::Delete(cm("b", "2")), value));
        assert!(!m.apply(Event::Delete(cm("b", "2")), value));
        assert_eq!(m.len(), 1);
    }
}
