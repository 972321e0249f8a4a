//! `./dev image`: the OCI image archive target/oci/registry-lb.tar, read back with
//! skopeo (installed by `./dev setup` / `./dev test`). The test runs `./dev image`
//! itself (twice, for reproducibility), so it also works alone:
//! `cargo test --test oci_image`. `./dev image` builds first; in `./dev test` the
//! build is already done and cargo and the wasm-opt cache find nothing to do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` with `stdin` as its standard input; its standard output, or a panic
/// with its standard error if it fails.
fn run_with(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{shown}: {e} (run `./dev setup` to install skopeo)"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{shown}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run(cmd: &mut Command) -> Vec<u8> {
    run_with(cmd, b"")
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

/// `sha256:<hex>` of `data`, by coreutils' sha256sum.
fn sha256(data: &[u8]) -> String {
    let out = text(run_with(&mut Command::new("sha256sum"), data));
    format!("sha256:{}", &out[..64])
}

/// `./dev image`; returns what it printed on stdout (the manifest digest).
fn dev_image() -> String {
    text(run(Command::new(root().join("dev"))
        .arg("image")
        .current_dir(root())))
    .trim()
    .to_string()
}

/// An octal field of a ustar header.
fn octal(field: &[u8]) -> u64 {
    let s = std::str::from_utf8(field).unwrap();
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(s, 8).unwrap()
}

/// The (name, mode, uid, gid, mtime, type, data) of every member of a ustar archive,
/// checking that what follows the last member is only zero blocks.
#[allow(clippy::type_complexity)]
fn tar_members(tar: &[u8]) -> Vec<(String, u64, u64, u64, u64, u8, Vec<u8>)> {
    let mut members = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() {
        let h = &tar[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            assert!(
                tar[at..].iter().all(|&b| b == 0),
                "data after the end-of-archive block at {at}"
            );
            return members;
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8(h[..name_end].to_vec()).unwrap();
        assert_eq!(&h[257..263], b"ustar\0", "{name}: not a ustar header");
        let size = octal(&h[124..136]) as usize;
        let data = tar[at + 512..at + 512 + size].to_vec();
        members.push((
            name,
            octal(&h[100..108]),
            octal(&h[108..116]),
            octal(&h[116..124]),
            octal(&h[136..148]),
            h[156],
            data,
        ));
        at += 512 + size.div_ceil(512) * 512;
    }
    panic!("archive of {} bytes has no end-of-archive block", tar.len());
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[test]
fn dev_image_is_a_one_layer_oci_image_of_the_built_wasm() {
    let printed = dev_image();
    let archive = root().join("target/oci/registry-lb.tar");
    let written = text(read(&root().join("target/oci/registry-lb.digest")));
    assert_eq!(written, format!("{printed}\n"), "digest file vs stdout");
    assert!(
        printed.starts_with("sha256:") && printed.len() == 71,
        "printed {printed:?}"
    );
    let wasm = read(&root().join("target/wasm32-wasip1/release/registry_lb.wasm"));
    assert_eq!(&wasm[..4], b"\0asm");
    let src = format!("oci-archive:{}", archive.display());

    // skopeo's own view: the digest of the manifest it resolves from index.json.
    let inspect = json(&run(Command::new("skopeo").args(["inspect", &src])));
    assert_eq!(inspect["Digest"], printed.as_str(), "{inspect}");
    assert_eq!(inspect["Architecture"], "wasm");
    assert_eq!(inspect["Os"], "wasip1");
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(1));
    let raw = run(Command::new("skopeo").args(["inspect", "--raw", &src]));
    assert_eq!(sha256(&raw), printed, "sha256 of skopeo inspect --raw");

    // Copy it out as a registry push would read it: manifest and blobs, digests checked.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    run(Command::new("skopeo").args(["copy", "--quiet", &src, &format!("dir:{}", dir.display())]));
    let manifest_bytes = read(&dir.join("manifest.json"));
    assert_eq!(
        sha256(&manifest_bytes),
        printed,
        "manifest.json from skopeo copy"
    );
    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], MANIFEST_TYPE);
    assert_eq!(manifest["config"]["mediaType"], CONFIG_TYPE);
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"],
        "compat"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], LAYER_TYPE);

    let blob = |d: &Value| {
        let d = d.as_str().unwrap();
        let b = read(&dir.join(d.strip_prefix("sha256:").unwrap()));
        assert_eq!(sha256(&b), d);
        b
    };
    let layer = blob(&layers[0]["digest"]);
    assert_eq!(layers[0]["size"], layer.len());
    let config_bytes = blob(&manifest["config"]["digest"]);
    assert_eq!(manifest["config"]["size"], config_bytes.len());

    // The layer: gzip with no time or name in its header (RFC 1952: MTIME is bytes
    // 4..8, FLG bit 3 is FNAME), around a tar with one member, plugin.wasm.
    assert_eq!(&layer[..3], [0x1f, 0x8b, 8], "gzip magic, deflate");
    assert_eq!(layer[3] & 0x08, 0, "gzip header carries a file name");
    assert_eq!(&layer[4..8], [0, 0, 0, 0], "gzip header carries a time");
    let layer_tar = run_with(Command::new("gzip").arg("-dc"), &layer);
    let listing = text(run_with(
        Command::new("tar").arg("-tf").arg("-"),
        &layer_tar,
    ));
    assert_eq!(listing, "plugin.wasm\n", "tar -t of the layer");
    let members = tar_members(&layer_tar);
    assert_eq!(members.len(), 1);
    let (name, mode, uid, gid, mtime, kind, data) = &members[0];
    assert_eq!(
        (name.as_str(), *mode, *uid, *gid, *mtime, *kind),
        ("plugin.wasm", 0o644, 0, 0, 0, b'0')
    );
    assert!(
        *data == wasm,
        "plugin.wasm ({} bytes) differs from registry_lb.wasm ({} bytes)",
        data.len(),
        wasm.len()
    );

    // The config: what OCI's image spec requires, the layer's uncompressed digest.
    let config = json(&config_bytes);
    assert_eq!(config["architecture"], "wasm");
    assert_eq!(config["os"], "wasip1");
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([sha256(&layer_tar)])
    );

    // The archive itself: fixed metadata on every entry too.
    let outer = read(&archive);
    let mut names = Vec::new();
    for (name, _, uid, gid, mtime, _, _) in tar_members(&outer) {
        assert_eq!((uid, gid, mtime), (0, 0, 0), "{name}");
        names.push(name);
    }
    assert_eq!(
        &names[..4],
        ["oci-layout", "index.json", "blobs/", "blobs/sha256/"]
    );
    assert_eq!(names.len(), 7, "{names:?}");

    // Reproducible: a second run, more than a second later (a clock time in a tar or
    // gzip header would differ), gives the same bytes and so the same digest.
    std::thread::sleep(Duration::from_millis(1100));
    let again = dev_image();
    assert_eq!(again, printed, "manifest digest of a second ./dev image");
    assert!(
        read(&archive) == outer,
        "archive bytes differ between two runs"
    );
}
