//! Self-test of the fake LLM upstream the proxy tests run against.
mod common;

use common::fake_upstream::{Config, FakeUpstream};

#[test]
fn starts() {
    let fake = FakeUpstream::start(Config::default());
    assert!(fake.url().starts_with("http://127.0.0.1:"));
}
