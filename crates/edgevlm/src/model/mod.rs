//! Model definitions: plain structs with `load` and `forward`, free of file and network I/O.

pub mod idefics3;
pub mod kv_cache;
pub mod nn;
pub mod text;
pub mod vision;

pub use idefics3::Idefics3;
pub use kv_cache::KvCache;
