//! Running a scenario over several seeds, naming the seed that failed.

/// The seeds every scenario runs with unless `MESHD_SIM_SEED` picks one.
pub const SEEDS: &[u64] = &[1, 2, 3, 0x5eed, 0xdead_beef];

/// Runs `scenario` once per seed in [`SEEDS`] (or only `MESHD_SIM_SEED`);
/// if it panics, says which seed failed and how to rerun just that one.
pub fn for_each_seed(mut scenario: impl FnMut(u64)) {
    let seeds = match std::env::var("MESHD_SIM_SEED") {
        Ok(s) => vec![s
            .parse()
            .unwrap_or_else(|_| panic!("MESHD_SIM_SEED={s:?} must be an unsigned integer"))],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        let _report = ReportSeedOnPanic(seed);
        scenario(seed);
    }
}

struct ReportSeedOnPanic(u64);

impl Drop for ReportSeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "simulation failed with seed {0}; rerun it alone with MESHD_SIM_SEED={0}",
                self.0
            );
        }
    }
}
