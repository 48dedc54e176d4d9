//! Every fuzz target's checked-in corpus (`fuzz/corpus/<target>/`), run
//! through its harness as a plain test: what the fuzzer once found, or was
//! seeded with, keeps passing on stable Rust without libFuzzer. The fuzzing
//! itself is `fuzz/run.sh` (see fuzz/README.md).
//!
//! `MESHD_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus -- --ignored`
//! writes the seeds of [`meshd::fuzzing::seeds`] into the corpus.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::fs;
use std::path::{Path, PathBuf};

use meshd::fuzzing::{seeds, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_corpus_file_passes_its_target() {
    let mut ran = 0;
    for (name, harness) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries.map(|e| e.expect("a corpus entry").path()).collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no seed", dir.display());
        for file in files {
            let data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // A panic names the target; the file is in the test's output.
            eprintln!("{name}: {}", file.display());
            harness(&data);
            ran += 1;
        }
    }
    assert!(ran >= TARGETS.len());
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_bin_in_the_fuzz_manifest() {
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("meshd::fuzzing::{name}(")),
            "{} calls its harness",
            file.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has a [[bin]] {name}"
        );
    }
}

#[test]
fn built_in_seeds_pass_their_targets() {
    for (name, harness) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has seeds");
        for (seed, data) in seeds {
            eprintln!("{name}: seed {seed}");
            harness(&data);
        }
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run with MESHD_WRITE_FUZZ_SEEDS=1"]
fn write_seeds() {
    if std::env::var_os("MESHD_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    for (name, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        for (seed, data) in seeds(name) {
            fs::write(dir.join(format!("seed-{seed}")), data).expect("write a seed");
        }
    }
}
