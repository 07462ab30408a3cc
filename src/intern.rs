//! Shared copies of strings that recur (namespaces, port names, node names, zones): the decoder
//! shares them within one document, the state machine across all it holds. Deterministic (a
//! `BTreeSet`); interning changes no value, only which allocation holds it.

use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Interner {
    set: BTreeSet<Arc<str>>,
    prune_at: usize,
}

impl Interner {
    /// The shared copy of `s` (made now if there is none).
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.set.insert(a.clone());
        a
    }

    /// Point `s` at the shared copy of its text (making it the shared copy if there is none).
    pub fn share(&mut self, s: &mut Arc<str>) {
        match self.set.get(&**s) {
            Some(shared) => {
                if !Arc::ptr_eq(shared, s) {
                    *s = shared.clone();
                }
            }
            None => {
                self.set.insert(s.clone());
            }
        }
    }

    pub fn share_opt(&mut self, s: &mut Option<Arc<str>>) {
        if let Some(s) = s {
            self.share(s);
        }
    }

    /// Strings held (for tests and measurements).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.set.iter()
    }

    /// Forget the strings nobody else holds any more, once the set has doubled since the last
    /// pruning: it never holds more than about twice what is in use.
    pub fn prune(&mut self) {
        if self.set.len() > self.prune_at {
            self.set.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = (self.set.len() * 2).max(64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_share_one_allocation_and_unused_ones_are_pruned() {
        let mut i = Interner::default();
        let a = i.get("default");
        let mut b: Arc<str> = "default".into();
        i.share(&mut b);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        for n in 0..100 {
            i.get(&n.to_string());
        }
        i.prune();
        assert!(i.set.is_empty(), "{} left", i.set.len());
    }
}
