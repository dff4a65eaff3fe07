//! What chat reuses between requests, within one memory budget: the encoded features of images
//! (keyed by the image's bytes: a conversation re-sends the same photo every turn), and the KV cache
//! of prompt prefixes (system prompt, earlier turns, the image block), least recently used first out.
//!
//! Reuse never changes an answer: image features are computed image by image either way, and a
//! prefix is reused only in whole prompt chunks that a prompt pass computed ([`PREFILL_CHUNK`]), so
//! the positions after it are computed in exactly the chunks a pass from scratch would use.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Tensor;

use super::generation::PREFILL_CHUNK;
use crate::model::KvCache;

/// An image's identity: two independently keyed 64-bit hashes of its encoded bytes (keys drawn per
/// process, so a client cannot craft a collision).
pub type ImageKey = u128;

/// `bytes` is the encoded image, `settings` how it is processed (features differ with them).
pub fn image_key(bytes: &[u8], settings: &str) -> ImageKey {
    static KEYS: OnceLock<[std::collections::hash_map::RandomState; 2]> = OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let hash = |k: &std::collections::hash_map::RandomState| {
        let mut h = k.build_hasher();
        h.write_usize(bytes.len());
        h.write(bytes);
        h.write(settings.as_bytes());
        h.finish()
    };
    (u128::from(hash(&keys[0])) << 64) | u128::from(hash(&keys[1]))
}

/// An image's features as its family's encoder produced them, with its layout.
pub struct CachedImage {
    pub layout: crate::model::family::ImageLayout,
    /// `(image tokens, hidden)`.
    pub features: Tensor,
}

/// A prompt prefix whose keys and values are kept: its ids, the images in it (first image-token
/// position, key), and the cache of its positions.
struct Prefix {
    ids: Vec<u32>,
    images: Vec<(usize, ImageKey)>,
    kv: KvCache,
}

enum Item {
    Image(ImageKey, Arc<CachedImage>),
    Prefix(Arc<Prefix>),
}

struct Entry {
    item: Item,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    used: usize,
    clock: u64,
}

/// The reuse cache of an engine; `budget` bytes in all (0: nothing is kept).
pub struct ReuseCache {
    budget: usize,
    state: Mutex<State>,
}

/// A prefix found for a new prompt: copy its first `len` positions into the new cache.
pub struct PrefixHit {
    prefix: Arc<Prefix>,
    pub len: usize,
}

impl PrefixHit {
    /// A cache for `capacity` positions holding the reused prefix.
    pub fn cache(&self, empty: KvCache) -> crate::Result<KvCache> {
        empty.with_prefix_of(&self.prefix.kv, self.len)
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl ReuseCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data: keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    fn insert(&self, item: Item, bytes: usize) {
        if bytes > self.budget {
            return;
        }
        let mut s = self.lock();
        while s.used + bytes > self.budget {
            let Some(oldest) = (0..s.entries.len()).min_by_key(|&i| s.entries[i].last_used) else {
                break;
            };
            let e = s.entries.swap_remove(oldest);
            s.used -= e.bytes;
        }
        s.clock += 1;
        let last_used = s.clock;
        s.used += bytes;
        s.entries.push(Entry {
            item,
            bytes,
            last_used,
        });
    }

    pub fn image(&self, key: ImageKey) -> Option<Arc<CachedImage>> {
        if !self.enabled() {
            return None;
        }
        let mut s = self.lock();
        s.clock += 1;
        let now = s.clock;
        s.entries.iter_mut().find_map(|e| match &e.item {
            Item::Image(k, img) if *k == key => {
                e.last_used = now;
                Some(img.clone())
            }
            _ => None,
        })
    }

    pub fn insert_image(&self, key: ImageKey, image: CachedImage) {
        if !self.enabled() || self.image(key).is_some() {
            return;
        }
        let bytes = tensor_bytes(&image.features);
        self.insert(Item::Image(key, Arc::new(image)), bytes);
    }

    /// The longest reusable prefix of a prompt of `ids` with `images` (first image-token position,
    /// key), in whole prompt chunks, leaving at least its last position to compute.
    pub fn prefix(&self, ids: &[u32], images: &[(usize, ImageKey)]) -> Option<PrefixHit> {
        if !self.enabled() || ids.len() <= PREFILL_CHUNK {
            return None;
        }
        let mut s = self.lock();
        s.clock += 1;
        let now = s.clock;
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in s.entries.iter().enumerate() {
            let Item::Prefix(p) = &e.item else { continue };
            let mut common = p.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
            // An image inside the shared ids must be the same image.
            for &(pos, key) in &p.images {
                if pos < common && !images.contains(&(pos, key)) {
                    common = common.min(pos);
                }
            }
            let len = common.min(ids.len() - 1) / PREFILL_CHUNK * PREFILL_CHUNK;
            if len > 0 && best.is_none_or(|(_, l)| len > l) {
                best = Some((i, len));
            }
        }
        let (i, len) = best?;
        s.entries[i].last_used = now;
        let Item::Prefix(prefix) = &s.entries[i].item else {
            return None;
        };
        Some(PrefixHit {
            prefix: prefix.clone(),
            len,
        })
    }

    /// Keep the whole prompt chunks of `kv` (a cache whose first positions a prompt pass of `ids`
    /// computed) for later prompts that start the same way.
    pub fn insert_prefix(
        &self,
        ids: &[u32],
        images: &[(usize, ImageKey)],
        kv: &KvCache,
    ) -> crate::Result<()> {
        let len = ids.len() / PREFILL_CHUNK * PREFILL_CHUNK;
        if !self.enabled() || len == 0 {
            return Ok(());
        }
        {
            // Already held (the same conversation again)?
            let s = self.lock();
            let known = s.entries.iter().any(|e| {
                matches!(&e.item, Item::Prefix(p)
                    if p.ids.len() >= len && p.ids[..len] == ids[..len]
                        && images.iter().filter(|(pos, _)| *pos < len).all(|im| p.images.contains(im)))
            });
            if known {
                return Ok(());
            }
        }
        let kv = kv.prefix(len)?;
        let bytes = kv.bytes();
        let prefix = Prefix {
            ids: ids[..len].to_vec(),
            images: images.iter().filter(|(p, _)| *p < len).copied().collect(),
            kv,
        };
        self.insert(Item::Prefix(Arc::new(prefix)), bytes);
        Ok(())
    }
}
