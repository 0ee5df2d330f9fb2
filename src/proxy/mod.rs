//! The metering sidecar proxy (loopback HTTP): identifies the agent by its
//! scoped token, admits or refuses, forwards with the real key, taps usage.
pub mod refusal;
pub mod simulated;
pub mod tokens;
