//! Objects in memory: a [`Blobs`] backend for unit tests and examples.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::blobs::{check_key, Blobs, ObjectMeta};
use super::{Blob, ByteRange, ByteStream, Result, StoreError};

/// A bucket that lives in memory and is lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryBlobs {
    /// An empty bucket.
    pub fn new() -> MemoryBlobs {
        MemoryBlobs::default()
    }
}

#[async_trait]
impl Blobs for MemoryBlobs {
    fn describe(&self) -> String {
        "memory://".into()
    }

    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Blob> {
        check_key(key)?;
        let data = self
            .objects
            .lock()
            .expect("objects")
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.into()))?;
        let total = data.len() as u64;
        let (start, end) = ByteRange::resolve_or_err(range, total)?;
        let part = data.slice(start as usize..end as usize);
        Ok(Blob {
            stream: Box::pin(futures::stream::once(async move { Ok(part) })),
            span: (start, end),
            encoding: None,
            total,
        })
    }

    async fn put(&self, key: &str, mut data: ByteStream, _content_type: &str) -> Result<u64> {
        check_key(key)?;
        let mut buf = Vec::new();
        while let Some(c) = data.next().await {
            buf.extend_from_slice(
                &c.map_err(|e| StoreError::backend(format!("receiving {key}"), e))?,
            );
        }
        let n = buf.len() as u64;
        self.objects
            .lock()
            .expect("objects")
            .insert(key.into(), buf.into());
        Ok(n)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.objects.lock().expect("objects").remove(key);
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        check_key(key)?;
        Ok(self
            .objects
            .lock()
            .expect("objects")
            .get(key)
            .map(|b| b.len() as u64))
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .objects
            .lock()
            .expect("objects")
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && !k[prefix.len()..].contains('/'))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                modified: None,
            })
            .collect())
    }
}
