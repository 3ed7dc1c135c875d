//! Hostile case files (issue 14): `Case::read` checks before it reads, refuses what is
//! not a regular file, duplicate keys, offsets past the file, and cases whose declared
//! dims ask for more work or memory than their data justifies — each fast and small.

use sdpa_harness::case::Case;
use sdpa_harness::HarnessError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A scratch file path unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdpa-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

/// A safetensors file from a raw header and data section.
fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// `Case::read(path)` on another thread: its error, or a panic if it takes `limit`.
fn read_within(path: &Path, limit: Duration) -> HarnessError {
    let (send, receive) = std::sync::mpsc::channel();
    let owned = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = send.send(Case::read(&owned));
    });
    match receive.recv_timeout(limit) {
        Ok(Ok(_)) => panic!("{}: read, expected a refusal", path.display()),
        Ok(Err(e)) => e,
        Err(_) => panic!(
            "{}: Case::read still running after {limit:?}",
            path.display()
        ),
    }
}

/// Peak resident set (`VmHWM`) in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in kB")
}

fn assert_mentions(err: &HarnessError, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(
            text.contains(part),
            "error {text:?} does not mention {part:?}"
        );
    }
}

/// q, k, v as zero-size tensors of these shapes (F32, no data), plus `extra` header
/// entries: what a hostile file declares to ask for work no data backs.
fn empty_qkv(q: [u64; 4], k: [u64; 4], v: [u64; 4]) -> Vec<u8> {
    let t = |s: [u64; 4]| {
        format!(
            "{{\"dtype\":\"F32\",\"shape\":[{},{},{},{}],\"data_offsets\":[0,0]}}",
            s[0], s[1], s[2], s[3]
        )
    };
    file_bytes(
        &format!("{{\"q\":{},\"k\":{},\"v\":{}}}", t(q), t(k), t(v)),
        &[],
    )
}

#[test]
fn a_sparse_gigabyte_of_zeros_is_refused_fast_and_small() {
    let path = scratch("zeros.safetensors");
    let file = std::fs::File::create(&path).expect("scratch file");
    file.set_len(1 << 30).expect("a sparse 1 GiB file");
    drop(file);
    let before = peak_rss_kib();
    let start = Instant::now();
    let err = read_within(&path, Duration::from_secs(5));
    let elapsed = start.elapsed();
    let grown_kib = peak_rss_kib().saturating_sub(before);
    std::fs::remove_file(&path).ok();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert!(grown_kib < 64 * 1024, "peak RSS grew by {grown_kib} KiB");
    assert_mentions(&err, &["zeros.safetensors"]);
}

#[test]
fn dev_zero_is_refused() {
    let err = read_within(Path::new("/dev/zero"), Duration::from_secs(5));
    assert_mentions(&err, &["/dev/zero", "a regular file", "a character device"]);
}

#[test]
fn a_directory_is_refused() {
    let dir = scratch("a_directory");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let err = read_within(&dir, Duration::from_secs(5));
    assert_mentions(&err, &["a_directory", "a regular file", "a directory"]);
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let path = scratch("case.fifo");
    let _ = std::fs::remove_file(&path);
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call, and
    // mkfifo reads nothing else.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    // No writer ever opens it: a blocking open or read would never return.
    let err = read_within(&path, Duration::from_secs(5));
    std::fs::remove_file(&path).ok();
    assert_mentions(&err, &["case.fifo", "a regular file", "a FIFO"]);
}

#[test]
fn a_header_length_past_the_file_is_refused() {
    let mut bytes = file_bytes("{}", &[]);
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let path = write("long_header.safetensors", &bytes);
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(
        &err,
        &[
            "long_header.safetensors",
            "header length",
            "at most 2 bytes",
            "1099511627776",
        ],
    );
    // Inside the file but over the cap.
    let header = format!("{{}}{}", " ".repeat((1 << 20) + 8));
    let path = write("capped_header.safetensors", &file_bytes(&header, &[]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(&err, &["capped_header.safetensors", "HEADER_CAP"]);
}

#[test]
fn data_offsets_past_the_file_are_refused() {
    // q claims 2^40 f32 values; the file holds 16 bytes.
    let header = "{\"q\":{\"dtype\":\"F32\",\"shape\":[1,1,1024,1073741824],\"data_offsets\":[0,4398046511104]}}";
    let path = write("huge_q.safetensors", &file_bytes(header, &[0; 16]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(
        &err,
        &[
            "huge_q.safetensors",
            "tensor q",
            "at most 16 bytes",
            "4398046511104 bytes",
        ],
    );
    // Offsets past the end with a shape that matches them.
    let header = "{\"q\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[16,48]}}";
    let path = write("past_end.safetensors", &file_bytes(header, &[0; 32]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(&err, &["past_end.safetensors", "tensor q", "[16, 48]"]);
    // A shape whose byte count overflows.
    let header =
        "{\"q\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}";
    let path = write("overflow.safetensors", &file_bytes(header, &[]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(
        &err,
        &["overflow.safetensors", "tensor q", "fits in 64 bits"],
    );
}

/// A valid one-element case, then its header with `q` (or a metadata key) repeated.
#[test]
fn duplicate_tensor_names_are_refused() {
    let t = |at: usize| {
        format!(
            "{{\"dtype\":\"F32\",\"shape\":[1,1,1,1],\"data_offsets\":[{},{}]}}",
            at * 4,
            at * 4 + 4
        )
    };
    let header = format!(
        "{{\"q\":{},\"k\":{},\"v\":{},\"q\":{}}}",
        t(0),
        t(1),
        t(2),
        t(3)
    );
    let path = write("dup_tensor.safetensors", &file_bytes(&header, &[0; 16]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(
        &err,
        &["dup_tensor.safetensors", "tensor name \"q\"", "once"],
    );
    // The same through from_bytes (what the fuzz target calls).
    let err = Case::from_bytes(&file_bytes(&header, &[0; 16])).unwrap_err();
    assert_mentions(&err, &["tensor name \"q\""]);
    // A field repeated inside a tensor's entry.
    let header = format!(
        "{{\"q\":{{\"dtype\":\"F32\",\"dtype\":\"F64\",\"shape\":[1,1,1,1],\"data_offsets\":[0,4]}},\"k\":{},\"v\":{}}}",
        t(1),
        t(2)
    );
    let err = Case::from_bytes(&file_bytes(&header, &[0; 12])).unwrap_err();
    assert_mentions(&err, &["tensor q key \"dtype\""]);
}

#[test]
fn duplicate_metadata_keys_are_refused() {
    let t = |at: usize| {
        format!(
            "{{\"dtype\":\"F32\",\"shape\":[1,1,1,1],\"data_offsets\":[{},{}]}}",
            at * 4,
            at * 4 + 4
        )
    };
    let header = format!(
        "{{\"__metadata__\":{{\"is_causal\":\"false\",\"is_causal\":\"true\"}},\"q\":{},\"k\":{},\"v\":{}}}",
        t(0),
        t(1),
        t(2)
    );
    let path = write("dup_meta.safetensors", &file_bytes(&header, &[0; 12]));
    let err = read_within(&path, Duration::from_secs(5));
    assert_mentions(
        &err,
        &["dup_meta.safetensors", "metadata key \"is_causal\"", "once"],
    );
    // Two __metadata__ objects.
    let header = format!(
        "{{\"__metadata__\":{{}},\"q\":{},\"k\":{},\"v\":{},\"__metadata__\":{{}}}}",
        t(0),
        t(1),
        t(2)
    );
    let err = Case::from_bytes(&file_bytes(&header, &[0; 12])).unwrap_err();
    assert_mentions(&err, &["header key \"__metadata__\""]);
    // Without the duplicate the file reads.
    let header = format!(
        "{{\"__metadata__\":{{\"is_causal\":\"true\"}},\"q\":{},\"k\":{},\"v\":{}}}",
        t(0),
        t(1),
        t(2)
    );
    Case::from_bytes(&file_bytes(&header, &[0; 12])).expect("a valid one-element case");
}

#[test]
fn e0_with_l_2_pow_60_is_refused_fast() {
    let l = 1u64 << 60;
    // Ev = 0 too: every tensor is empty, the lse alone would be 2^62 bytes.
    let bytes = empty_qkv([1, 1, l, 0], [1, 1, 1, 0], [1, 1, 1, 0]);
    assert!(bytes.len() <= 240, "{} bytes", bytes.len());
    let path = write("l_2_pow_60.safetensors", &bytes);
    let start = Instant::now();
    let err = read_within(&path, Duration::from_secs(5));
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    assert_mentions(
        &err,
        &["l_2_pow_60.safetensors", "case size", &format!("L {l}")],
    );
}

#[test]
fn l_and_s_2_pow_20_with_e0_is_refused_fast() {
    let n = 1u64 << 20;
    let path = write(
        "ls_2_pow_20.safetensors",
        &empty_qkv([1, 1, n, 0], [1, 1, n, 0], [1, 1, n, 0]),
    );
    let start = Instant::now();
    let err = read_within(&path, Duration::from_secs(5));
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    assert_mentions(
        &err,
        &[
            "ls_2_pow_20.safetensors",
            "case size",
            "operations",
            "L 1048576, S 1048576",
        ],
    );
}

#[test]
fn l_2_pow_32_with_s0_is_refused_fast() {
    let l = 1u64 << 32;
    let bytes = empty_qkv([1, 1, l, 0], [1, 1, 0, 0], [1, 1, 0, 1]);
    let start = Instant::now();
    let err = Case::from_bytes(&bytes).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    assert_mentions(&err, &["case size", &format!("L {l}, S 0")]);
}

#[test]
fn many_empty_heads_are_refused() {
    // Nothing to compute per element, but a task and a widened k/v per head.
    let h = 1u64 << 40;
    let err = Case::from_bytes(&empty_qkv([1, h, 0, 0], [1, h, 0, 0], [1, h, 0, 0])).unwrap_err();
    assert_mentions(&err, &["case size", &format!("Hq {h}")]);
}

#[test]
fn small_degenerate_cases_still_read() {
    // E = 0 with small L and S: work the free allowance covers.
    Case::from_bytes(&empty_qkv([1, 2, 100, 0], [1, 2, 100, 0], [1, 2, 100, 0]))
        .expect("a small E = 0 case");
}

#[test]
fn a_committed_golden_case_still_reads() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&golden)
        .expect("golden/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden cases");
    for path in &files {
        let case = Case::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bytes = std::fs::read(path).expect("readable golden");
        // Bytes, not `Case`s: goldens hold NaN, which equals nothing.
        let from_bytes = Case::from_bytes(&bytes).expect("from_bytes");
        assert_eq!(from_bytes.to_bytes().expect("serialises"), bytes);
        assert_eq!(
            case.to_bytes().expect("serialises"),
            bytes,
            "{}",
            path.display()
        );
    }
}
