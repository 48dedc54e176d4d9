//! Security floors on the dependency graph, checked in the lockfile so they
//! hold even where the RustSec advisory database can't be fetched (tests/run.sh
//! runs `cargo audit` where it can).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::path::Path;

/// (crate, minimum version, why)
const FLOORS: &[(&str, (u64, u64, u64), &str)] = &[(
    "quinn-proto",
    (0, 11, 18),
    "remote panic on crafted packets before 0.11.18",
)];

fn parse_version(v: &str) -> (u64, u64, u64) {
    let mut parts = v
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn the_lockfile_never_resolves_below_the_security_floors() {
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let lock: toml::Table = toml::from_str(&lock).unwrap();
    let packages = lock["package"].as_array().unwrap();
    for (name, floor, why) in FLOORS {
        let versions: Vec<&str> = packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .filter_map(|p| p["version"].as_str())
            .collect();
        assert!(!versions.is_empty(), "{name} is not in Cargo.lock");
        for v in versions {
            assert!(
                parse_version(v) >= *floor,
                "{name} {v} is below {floor:?}: {why}"
            );
        }
    }
}
