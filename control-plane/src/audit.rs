//! The tamper-evident audit log: the pure hash chain ([`chain`]) and ingest validation
//! ([`ingest`]). Persistence lives in `storage::audit`.

pub mod chain;
pub mod ingest;
