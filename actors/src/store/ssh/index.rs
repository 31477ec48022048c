//! Which store paths the remote store has, by digest.
//!
//! Binary-cache clients ask by digest (`<digest>.narinfo`), but the serve protocol only
//! answers about full store paths and has no hash-part lookup (Nix 2.8 serves commands 1-9:
//! valid paths, path infos, dump, import, export, build, closure, build derivation, add NAR).
//! So the names in the remote store directory are listed once and kept; a digest that is not
//! there triggers a new listing, at most once per [`REFRESH_INTERVAL`], with concurrent
//! misses sharing one listing. Entries may be stale (a name listed but no longer valid, or a
//! lock file): callers confirm with the server, which is the authority on validity.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::formats::StorePath;
use crate::store::StoreError;

/// Minimum time between two listings of the remote store.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Names {
    by_digest: HashMap<String, Vec<String>>,
    /// True while a listing runs: names added meanwhile must survive its result.
    listing: bool,
    added_meanwhile: Vec<String>,
}

impl Names {
    fn insert(&mut self, base_name: &str) {
        if let Ok(p) = StorePath::from_base_name(base_name) {
            let names = self.by_digest.entry(p.digest().to_string()).or_default();
            if !names.iter().any(|n| n == base_name) {
                names.push(base_name.to_owned());
            }
        }
    }
}

/// The last listing's outcome.
struct Listed {
    at: Instant,
    /// Why it failed, if it did.
    failed: Option<StoreError>,
}

/// The digest → store path names map of a remote store.
#[derive(Default)]
pub struct DigestIndex {
    names: Mutex<Names>,
    /// The last listing; holding the lock is being the one listing.
    last: tokio::sync::Mutex<Option<Listed>>,
}

impl DigestIndex {
    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names (`<digest>-<name>`) known for `digest`; usually one.
    pub fn lookup(&self, digest: &str) -> Vec<String> {
        self.names()
            .by_digest
            .get(digest)
            .cloned()
            .unwrap_or_default()
    }

    /// Records a name that became valid (an import).
    pub fn add(&self, base_name: &str) {
        let mut n = self.names();
        n.insert(base_name);
        if n.listing {
            n.added_meanwhile.push(base_name.to_owned());
        }
    }

    /// Every name known.
    pub fn all(&self) -> Vec<String> {
        self.names().by_digest.values().flatten().cloned().collect()
    }

    /// Replaces the map with a fresh listing from `list`, unless one finished less than
    /// `max_age` ago (possibly while this call waited for another caller's listing): then
    /// that listing's outcome is this one's. A listing that failed moments ago fails this
    /// call too, rather than let the caller answer "not found" from a map it could not
    /// renew (Nix would remember the path as missing for an hour).
    pub async fn refresh<F, Fut>(&self, max_age: Duration, list: F) -> Result<(), StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<String>, StoreError>>,
    {
        let mut last = self.last.lock().await;
        if let Some(recent) = last.as_ref().filter(|l| l.at.elapsed() < max_age) {
            return recent.failed.clone().map_or(Ok(()), Err);
        }
        {
            let mut n = self.names();
            n.listing = true;
            n.added_meanwhile.clear();
        }
        let listed = list().await;
        // A failed listing counts too: retrying it on every miss would flood the host.
        *last = Some(Listed {
            at: Instant::now(),
            failed: listed.as_ref().err().cloned(),
        });
        let mut n = self.names();
        n.listing = false;
        let added = std::mem::take(&mut n.added_meanwhile);
        let listed = listed?;
        let mut fresh = Names::default();
        for name in listed.iter().chain(&added) {
            fresh.insert(name);
        }
        *n = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "wxbdhil717xasnf3c4lq7p5q6npm3cid-testapp";
    const A_LOCK: &str = "wxbdhil717xasnf3c4lq7p5q6npm3cid-testapp.lock";
    const B: &str = "0a9k6j9sfy79b2g3k9zzirbiqf85g7ga-dir1";

    #[tokio::test]
    async fn lists_once_per_interval_and_keeps_what_was_added_meanwhile() {
        let idx = DigestIndex::default();
        assert!(idx.lookup(&A[..32]).is_empty());
        idx.refresh(REFRESH_INTERVAL, || async {
            Ok(vec![A.into(), A_LOCK.into(), ".links".into(), ".".into()])
        })
        .await
        .unwrap();
        assert_eq!(idx.lookup(&A[..32]), vec![A.to_owned(), A_LOCK.to_owned()]);
        // Within the interval, no second listing.
        idx.refresh(REFRESH_INTERVAL, || async {
            Err(StoreError::Invalid("listed twice".into()))
        })
        .await
        .unwrap();
        // A listing replaces the map, except for names added while it ran.
        idx.refresh(Duration::ZERO, || async {
            idx.add(B);
            Ok(vec![])
        })
        .await
        .unwrap();
        assert!(idx.lookup(&A[..32]).is_empty());
        assert_eq!(idx.all(), vec![B.to_owned()]);
        // A failed listing keeps the old map.
        let down = || async { Err(StoreError::Unavailable("host down".into())) };
        assert!(idx.refresh(Duration::ZERO, down).await.is_err());
        assert_eq!(idx.all(), vec![B.to_owned()]);
        // Within the interval after a failed listing, no listing and no answer from the old
        // map: the failure again (a miss taken for "not found" would be cached by clients).
        let again = idx
            .refresh(REFRESH_INTERVAL, || async { Ok(vec![A.into()]) })
            .await;
        assert!(
            matches!(&again, Err(StoreError::Unavailable(m)) if m == "host down"),
            "{again:?}"
        );
        assert!(idx.lookup(&A[..32]).is_empty(), "not listed again");
        idx.refresh(Duration::ZERO, || async { Ok(vec![A.into()]) })
            .await
            .unwrap();
        assert_eq!(idx.all(), vec![A.to_owned()]);
    }
}
