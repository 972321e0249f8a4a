//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/*`) and the minimized inputs of
//! past findings (`fuzz/regressions/<target>/*`) through the fuzz targets' bodies
//! (`registry_lb::fuzzing`), with the same counting allocator and allocation bound as
//! under libFuzzer: a corpus file that panics, breaks a property or allocates over the
//! bound fails this test, naming the file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use registry_lb::fuzzing::{alloc::Counting, bounded, Body, TARGETS};
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: Counting = Counting;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file());
    out.sort();
    out
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every saved input of each target through its body: (inputs run, failures).
fn replay(targets: &[(&str, Body)]) -> (usize, Vec<String>) {
    let root = fuzz_dir();
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, body) in targets {
        let corpus = files(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name}/ is empty or missing"
        );
        for path in corpus
            .into_iter()
            .chain(files(&root.join("regressions").join(name)))
        {
            let data = std::fs::read(&path).unwrap();
            ran += 1;
            match std::panic::catch_unwind(|| bounded(name, *body, &data)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("{}: {e}", path.display())),
                Err(_) => failures.push(format!("{}: panicked", path.display())),
            }
        }
    }
    (ran, failures)
}

#[test]
fn every_saved_fuzz_input_passes_its_target() {
    let (ran, failures) = replay(TARGETS);
    assert!(
        failures.is_empty(),
        "{} of {ran} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every corpus directory belongs to a target (a renamed target leaves none behind).
    for dir in std::fs::read_dir(fuzz_dir().join("corpus")).unwrap() {
        let name = dir.unwrap().file_name().into_string().unwrap();
        assert!(
            TARGETS.iter().any(|(n, _)| *n == name),
            "fuzz/corpus/{name}/ has no target"
        );
    }
}

#[test]
fn a_body_that_panics_or_fails_fails_the_replay() {
    fn panics(_: &[u8]) -> Result<(), String> {
        panic!("boom")
    }
    fn fails(_: &[u8]) -> Result<(), String> {
        Err("property broken".into())
    }
    fn hoards(data: &[u8]) -> Result<(), String> {
        let v = vec![0u8; registry_lb::fuzzing::alloc_bound(data.len()) + 1];
        std::hint::black_box(&v);
        Ok(())
    }
    let n = |t: &str| {
        files(&fuzz_dir().join("corpus").join(t)).len()
            + files(&fuzz_dir().join("regressions").join(t)).len()
    };
    let (ran, failures) = replay(&[
        ("duration", panics),
        ("subset", fails),
        ("hash_key", hoards),
    ]);
    assert_eq!(ran, n("duration") + n("subset") + n("hash_key"));
    assert_eq!(failures.len(), ran, "{failures:?}");
    assert!(failures.iter().any(|f| f.contains("panicked")));
    assert!(failures.iter().any(|f| f.contains("property broken")));
    assert!(failures.iter().any(|f| f.contains("over the bound")));
}
