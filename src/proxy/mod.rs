//! The metering proxy's pure cores: what it needs to read from the traffic it
//! forwards. `sse` splits an event stream and keeps event byte spans so the
//! original bytes can pass through; `usage` reads exact usage (and what the
//! runaway detector wants) from answers; `estimate` bounds a request's worst case
//! before it is forwarded. Nothing here does I/O, holds a lock or logs: the HTTP
//! shell calls these per request and per chunk.

pub mod estimate;
pub mod sse;
pub mod usage;
