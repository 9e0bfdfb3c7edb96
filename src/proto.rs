//! Generated protobuf types (prost, built from `proto/` into OUT_DIR).
//!
//! These types stay at the edge: [`crate::model`] converts them into domain
//! types once, on receipt, and rejects junk there.

/// Wire protocol `herald.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/herald.v1.rs"));
}

/// On-disk records of the embedded store.
pub mod store {
    include!(concat!(env!("OUT_DIR"), "/herald.store.v1.rs"));
}
