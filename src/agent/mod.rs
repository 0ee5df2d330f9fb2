//! One actor per agent: spawn, watch, stop, restart with backoff.
