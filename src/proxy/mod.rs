//! The metering sidecar proxy (loopback HTTP): identifies the agent by its
//! scoped token, admits or refuses, forwards with the real key, taps usage.
//!
//! Pure cores: `sse` splits an event stream and keeps event byte spans so the
//! original bytes pass through; `usage` reads exact usage (and what the runaway
//! detector wants) from answers; `estimate` bounds a request's worst case before
//! it is forwarded, with `chain` (per agent: the server-side context of the
//! Responses answers it metered) for continued requests; `refusal` shapes the proxy's own answers; `route` is the allow-list
//! (canonical path, exact routes, the upstream URL); `simulated` is the
//! offline model; `capacity` counts connections and buffered body bytes
//! against the caps. The shell (`server`) calls these per request and per chunk.

mod admission;
mod answer;
pub mod capacity;
pub mod chain;
mod client_io;
pub mod estimate;
pub mod meter;
pub mod refusal;
pub mod route;
pub mod server;
pub mod simulated;
pub mod sse;
pub mod tokens;
pub mod usage;
