//! fleet.yaml: schema, parsing with source locations, validation that collects
//! every error, defaults merging, and `diff(old, new)`. Pure apart from reading
//! the file; must not start processes or resolve secrets.

mod model;

pub use model::*;
