//! Case files (DESIGN.md, "Case files and goldens"): a safetensors file with tensors
//! `q`, `k`, `v`, optional `attn_mask` (bool or additive), optional expected results
//! (`out`, `out_f64`, `lse`, `lse_f64`, ...), and the options as `__metadata__` strings:
//! `is_causal`, `causal` (`none`/`top_left`/`bottom_right`), `dropout_p`, `seed`,
//! `offset`, `scale`, `enable_gqa`. Files written by `safetensors.torch.save_file`
//! replay as they are.
//!
//! # Reading a file
//! Nothing is read that has not been checked ([`Case::read`]): the file must be a
//! regular file; the header length must fit the file and [`HEADER_CAP`]; every tensor's
//! `data_offsets` must lie inside the file and span its dtype x shape bytes; the case
//! must fit the budget; only then is the tensor data read. Duplicate tensor names,
//! metadata keys or tensor fields are refused, not resolved.
//!
//! # The budget
//! A guard against hostile or broken files, not a performance estimate. Zero-size
//! tensors store no data whatever their other dims, so a file of a few hundred bytes
//! can declare `L = 2^60` or `L = S = 2^20` with `E = 0`, and the reference would
//! allocate the output and lse or score every pair. The budget counts, from the
//! declared shapes, the reference's operations (per score the softmax and the
//! `E + Ev` multiply-adds of the two GEMMs; per query row, per head and per kv head
//! their own work) and the bytes it allocates (out, lse, the widened k and v, a
//! `[64, S]` score block per worker, the f64 copies of the inputs), and refuses a case
//! that needs more than
//! - what its data justifies: `5e7 + n^2` operations and `16 MiB + 8 n^2` bytes for
//!   the `n` elements q, k, v and the mask store. A case whose tensors hold their data
//!   needs at most `n^2 / 2 + 2n` operations and `4.25 n^2 + 148 n` bytes, so this
//!   refuses only dims no data backs; a file of a few KiB gets about 0.3 s and a few
//!   tens of MB at most;
//! - `1e13` operations: above the largest case replayed on the CPU reference
//!   (`L = S = 32768`, 32 heads, `E = Ev = 128`: 8.8e12);
//! - `MemAvailable` of `/proc/meminfo` (4 GiB where it cannot be read).
//!
//! The math backend on a GPU stores the whole `[B, Hq, L, S]`; its memory is the
//! device's, which `sdpa-core`'s `Problem::new` and the CUDA crate bound.

use crate::error::{HarnessError, Result};
use crate::tensor::Tensor;
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// One SDPA call with its inputs, options and any stored results.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// `[B, Hq, L, E]`.
    pub q: Tensor,
    /// `[B, Hkv, S, E]`.
    pub k: Tensor,
    /// `[B, Hkv, S, Ev]`.
    pub v: Tensor,
    /// Bool or additive mask, broadcastable to `[B, Hq, L, S]`.
    pub attn_mask: Option<Tensor>,
    /// Causal, dropout, scale, GQA.
    pub options: SdpaOptions,
    /// Every other tensor of the file (`out`, `out_f64`, `lse`, ...), by name.
    pub results: BTreeMap<String, Tensor>,
    /// Metadata keys this crate does not interpret (`name`, `torch_backend`, ...).
    pub extra_metadata: BTreeMap<String, String>,
}

pub(crate) const OPTION_KEYS: [&str; 10] = [
    "is_causal",
    "causal",
    "dropout_p",
    "seed",
    "offset",
    "scale",
    "enable_gqa",
    "window_left",
    "window_right",
    "softcap",
];

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(HarnessError::case(
            format!("metadata {key}"),
            "true or false",
            format!("{value:?}"),
        )),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str, expected: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| HarnessError::case(format!("metadata {key}"), expected, format!("{value:?}")))
}

/// Reads the options from `__metadata__`; absent keys take PyTorch's defaults.
pub fn parse_options(meta: &HashMap<String, String>) -> Result<SdpaOptions> {
    let get = |k: &str| meta.get(k).map(String::as_str);
    let is_causal = get("is_causal")
        .map(|v| parse_bool("is_causal", v))
        .transpose()?;
    let causal = match get("causal") {
        Some(v) => Some(v.trim().parse::<Causal>().map_err(|_| {
            HarnessError::case(
                "metadata causal",
                "none, top_left or bottom_right",
                format!("{v:?}"),
            )
        })?),
        None => None,
    };
    let causal = match (is_causal, causal) {
        (Some(true), Some(Causal::None)) => {
            return Err(HarnessError::case(
                "metadata causal",
                "top_left or bottom_right (is_causal is true)",
                "\"none\"",
            ))
        }
        (_, Some(c)) => c,
        (Some(true), None) => Causal::TopLeft,
        _ => Causal::None,
    };
    let dropout = Dropout::new(
        get("dropout_p")
            .map(|v| parse_num("dropout_p", v, "a number"))
            .transpose()?
            .unwrap_or(0.0),
        get("seed")
            .map(|v| parse_num("seed", v, "an unsigned 64-bit integer"))
            .transpose()?
            .unwrap_or(0),
        get("offset")
            .map(|v| parse_num("offset", v, "an unsigned 64-bit integer"))
            .transpose()?
            .unwrap_or(0),
    );
    let scale = match get("scale").map(str::trim) {
        None | Some("") | Some("none") | Some("None") => None,
        Some(v) => Some(parse_num("scale", v, "a number or none")?),
    };
    let enable_gqa = get("enable_gqa")
        .map(|v| parse_bool("enable_gqa", v))
        .transpose()?
        .unwrap_or(false);
    let side = |key: &'static str| -> Result<i64> {
        match get(key).map(str::trim) {
            None | Some("") => Ok(-1),
            Some(v) => parse_num(key, v, "-1 (unbounded) or a key count >= 0"),
        }
    };
    let window = Window {
        left: side("window_left")?,
        right: side("window_right")?,
    };
    let softcap = match get("softcap").map(str::trim) {
        None | Some("") | Some("none") | Some("None") | Some("0") => None,
        Some(v) => Some(parse_num(
            "softcap",
            v,
            "a positive number, or 0 / none for none",
        )?),
    };
    Ok(SdpaOptions {
        causal,
        dropout,
        scale,
        enable_gqa,
        window,
        softcap,
    })
}

/// The options as `__metadata__` strings.
pub fn options_metadata(options: &SdpaOptions) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "is_causal".into(),
        (options.causal == Causal::TopLeft).to_string(),
    );
    m.insert("causal".into(), options.causal.name().into());
    m.insert("dropout_p".into(), options.dropout.p.to_string());
    m.insert("seed".into(), options.dropout.seed.to_string());
    m.insert("offset".into(), options.dropout.offset.to_string());
    // Only where set: cases without them keep their bytes.
    if options.window.is_active() {
        m.insert("window_left".into(), options.window.left.to_string());
        m.insert("window_right".into(), options.window.right.to_string());
    }
    if let Some(c) = options.softcap {
        m.insert("softcap".into(), c.to_string());
    }
    if let Some(s) = options.scale {
        m.insert("scale".into(), format!("{s:?}"));
    }
    m.insert("enable_gqa".into(), options.enable_gqa.to_string());
    m
}

impl Case {
    /// A case with no stored results.
    pub fn new(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Option<Tensor>,
        options: SdpaOptions,
    ) -> Self {
        Case {
            q,
            k,
            v,
            attn_mask,
            options,
            results: BTreeMap::new(),
            extra_metadata: BTreeMap::new(),
        }
    }

    /// Parses a case from the bytes of a safetensors file.
    ///
    /// Checks, in this order: the header length against the buffer and
    /// [`HEADER_CAP`]; the header JSON (duplicate tensor names, metadata keys or tensor
    /// fields refused); every tensor's `data_offsets` against the data the buffer holds
    /// and its dtype x shape byte count; the case's work and memory against the
    /// [budget](Case::check_budget); only then are tensors built from the data.
    ///
    /// # Errors
    /// An empty, truncated or non-safetensors buffer; a duplicate key; a missing `q`,
    /// `k` or `v`; an unsupported dtype; q/k/v not 4-d or not floating point; malformed
    /// metadata; a case over the budget.
    pub fn from_bytes(bytes: &[u8]) -> Result<Case> {
        Case::from_parts(parts_from_bytes(bytes)?)
    }

    /// Reads a case file.
    ///
    /// Reads no more than it has checked: opens the file without blocking (a FIFO
    /// cannot stall the open), refuses anything but a regular file (FIFO, device,
    /// directory, socket) from the metadata of the opened handle, reads the 8-byte
    /// header length and checks it against the file size and [`HEADER_CAP`], reads and
    /// checks the header as [`Case::from_bytes`] does (offsets against the file size,
    /// then the budget), and only then reads the tensor data.
    ///
    /// # Errors
    /// I/O errors and everything [`Case::from_bytes`] rejects, prefixed with the path.
    pub fn read(path: impl AsRef<Path>) -> Result<Case> {
        let path = path.as_ref();
        read_parts(path)
            .and_then(Case::from_parts)
            .map_err(|e| in_file(path, e))
    }

    /// Refuses a case whose forward pass on the CPU reference would need more work or
    /// memory than [the budget](crate::case#the-budget) allows. [`Case::read`] and
    /// [`Case::from_bytes`] call it before reading any tensor data; call it for a case
    /// built some other way before running it.
    ///
    /// # Errors
    /// The operations or bytes needed and the limit they exceed, with the dims.
    pub fn check_budget(&self) -> Result<()> {
        let mask = self.attn_mask.as_ref().map(Tensor::shape);
        check_budget(self.q.shape(), self.k.shape(), self.v.shape(), mask)
    }

    /// Serialises the case (inputs, results and metadata) as safetensors bytes.
    /// Deterministic: the same case gives the same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut named: Vec<(String, &Tensor)> = vec![
            ("q".into(), &self.q),
            ("k".into(), &self.k),
            ("v".into(), &self.v),
        ];
        if let Some(m) = &self.attn_mask {
            named.push(("attn_mask".into(), m));
        }
        named.extend(self.results.iter().map(|(n, t)| (n.clone(), t)));
        let mut meta = options_metadata(&self.options);
        meta.extend(self.extra_metadata.clone());
        Ok(serialize(&named, &meta))
    }

    /// Writes the case to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| HarnessError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// A stored result tensor by name.
    pub fn result(&self, name: &str) -> Option<&Tensor> {
        self.results.get(name)
    }

    /// `name` from the metadata, if the file has one.
    pub fn name(&self) -> Option<&str> {
        self.extra_metadata.get("name").map(String::as_str)
    }

    /// The `alibi_slopes` tensor (f32 `[Hq]` or `[B, Hq]`, DESIGN.md "Case-file fields"),
    /// if the file has one; its shape and values are the call's to check.
    ///
    /// # Errors
    /// An `alibi_slopes` tensor that is not f32.
    pub fn alibi_slopes(&self) -> Result<Option<ndarray::ArrayViewD<'_, f32>>> {
        match self.results.get("alibi_slopes") {
            None => Ok(None),
            Some(Tensor::F32(a)) => Ok(Some(a.view())),
            Some(other) => Err(HarnessError::case(
                "tensor alibi_slopes",
                "f32 [Hq] or [B, Hq]",
                format!("{} {:?}", other.dtype_name(), other.shape()),
            )),
        }
    }
}

/// The largest header a case file may declare, in bytes. safetensors allows 100 MB,
/// for checkpoints with thousands of tensors; a case holds a dozen tensors and a few
/// metadata strings (the goldens' headers are under 1 KiB), so 1 MiB is three orders of
/// magnitude of headroom while keeping what a hostile length field can make us read
/// and parse small.
pub const HEADER_CAP: u64 = 1 << 20;

/// Operations any case may ask for whatever data it holds: about 0.3 s of the
/// reference on one core (1e8 softmax-only scores, E = 0, measured 0.55 s), so that
/// degenerate cases (E = 0, S = 0) stay runnable while a few-byte file cannot buy
/// more than a fraction of a second.
const WORK_FREE: u128 = 50_000_000;

/// Operations no case may ask for: above the largest problem anyone replays on the
/// CPU reference (L = S = 32768, 32 heads, E = Ev = 128 is 8.8e12), and already
/// about an hour of the reference on a 16-core host.
const WORK_CAP: u128 = 10_000_000_000_000;

/// Bytes any case may ask for whatever data it holds (see [`WORK_FREE`]).
const MEMORY_FREE: u128 = 16 << 20;

/// Bytes a case may ask for when `/proc/meminfo` cannot be read.
const MEMORY_FALLBACK: u128 = 4 << 30;

/// Query rows the reference scores at a time (`sdpa_ref`'s `QUERY_BLOCK`).
const REFERENCE_QUERY_BLOCK: u128 = 64;

fn too_short(len: u64) -> HarnessError {
    HarnessError::case(
        "case file",
        "a safetensors file (an 8-byte header length, then the header)",
        format!("{len} bytes"),
    )
}

/// The header length from the first 8 bytes of a file of `file_len` bytes.
fn header_len(prefix: [u8; 8], file_len: u64) -> Result<usize> {
    let n = u64::from_le_bytes(prefix);
    let room = file_len.saturating_sub(8);
    if n > room {
        return Err(HarnessError::case(
            "case file header length",
            format!("at most {room} bytes (what follows the length field)"),
            format!("{n} bytes"),
        ));
    }
    if n > HEADER_CAP {
        return Err(HarnessError::case(
            "case file header length",
            format!("at most {HEADER_CAP} bytes (HEADER_CAP)"),
            format!("{n} bytes"),
        ));
    }
    Ok(n as usize)
}

/// One tensor as the header declares it, checked against the data it points into.
struct Entry {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A parsed and checked header: every tensor's bytes lie inside the data and tile it.
struct Header {
    tensors: Vec<Entry>,
    metadata: HashMap<String, String>,
}

/// JSON as written, objects as ordered key-value pairs: unlike `serde_json::Value`,
/// whose map keeps the last of duplicate keys, it lets the reader see duplicates.
enum Json {
    Scalar(serde_json::Value),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Scalar(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Scalar(serde_json::Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Json::Object(entries))
    }
}

impl Json {
    /// The value as `serde_json` holds it, refusing an object that repeats a key:
    /// `what` names the object in the error (`tensor q`, `metadata`).
    fn into_value(self, what: &str) -> Result<serde_json::Value> {
        Ok(match self {
            Json::Scalar(v) => v,
            Json::Array(items) => serde_json::Value::Array(
                items
                    .into_iter()
                    .map(|item| item.into_value(what))
                    .collect::<Result<_>>()?,
            ),
            Json::Object(entries) => {
                let mut map = serde_json::Map::new();
                for (key, value) in entries {
                    if map.contains_key(&key) {
                        return Err(duplicate(what, "key", &key));
                    }
                    let value = value.into_value(what)?;
                    map.insert(key, value);
                }
                serde_json::Value::Object(map)
            }
        })
    }
}

fn duplicate(what: &str, kind: &str, key: &str) -> HarnessError {
    HarnessError::case(
        format!("{what} {kind} {key:?}"),
        format!("each {kind} once"),
        "it twice (readers keep one silently)",
    )
}

impl Header {
    /// Parses the header JSON and checks every tensor's offsets against the `data_len`
    /// bytes that follow the header, as safetensors validates them: each tensor's
    /// byte count is its dtype size times its shape's product (checked), the tensors
    /// tile the data in offset order, with no gap, overlap or trailing byte.
    fn parse(json: &[u8], data_len: usize) -> Result<Header> {
        let unreadable = |e: &dyn std::fmt::Display| {
            HarnessError::case(
                "case file",
                "a safetensors file",
                format!("unreadable header ({e})"),
            )
        };
        let Json::Object(entries) =
            serde_json::from_slice::<Json>(json).map_err(|e| unreadable(&e))?
        else {
            return Err(unreadable(&"not a JSON object"));
        };
        let mut seen = std::collections::HashSet::new();
        let mut metadata = HashMap::new();
        let mut tensors = Vec::new();
        for (name, value) in entries {
            if !seen.insert(name.clone()) {
                return Err(if name == "__metadata__" {
                    duplicate("header", "key", &name)
                } else {
                    duplicate("tensor", "name", &name)
                });
            }
            if name == "__metadata__" {
                metadata = parse_metadata(value)?;
                continue;
            }
            let what = format!("tensor {name}");
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(value.into_value(&what)?).map_err(|e| {
                    HarnessError::case(
                        &what,
                        "{\"dtype\", \"shape\", \"data_offsets\": [start, end]}",
                        e,
                    )
                })?;
            let (start, end) = info.data_offsets;
            let nbytes = info
                .shape
                .iter()
                .try_fold(info.dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    HarnessError::case(
                        &what,
                        "a shape whose byte count fits in 64 bits",
                        format!("{:?} {:?}", info.dtype, info.shape),
                    )
                })?;
            if nbytes > data_len {
                return Err(HarnessError::case(
                    &what,
                    format!("at most {data_len} bytes (the data the file holds)"),
                    format!("{nbytes} bytes for {:?} {:?}", info.dtype, info.shape),
                ));
            }
            if start > end || end > data_len {
                return Err(HarnessError::case(
                    &what,
                    format!("data_offsets [start, end] with start <= end <= {data_len}"),
                    format!("[{start}, {end}]"),
                ));
            }
            if end - start != nbytes {
                return Err(HarnessError::case(
                    &what,
                    format!(
                        "data_offsets spanning {nbytes} bytes ({:?} {:?})",
                        info.dtype, info.shape
                    ),
                    format!("[{start}, {end}], {} bytes", end - start),
                ));
            }
            tensors.push(Entry {
                name,
                dtype: info.dtype,
                shape: info.shape,
                start,
                end,
            });
        }
        tensors.sort_by_key(|t| (t.start, t.end));
        let mut next = 0;
        for t in &tensors {
            if t.start != next {
                return Err(HarnessError::case(
                    format!("tensor {}", t.name),
                    format!("data starting at byte {next}, where the previous tensor ends"),
                    format!("data_offsets [{}, {}]", t.start, t.end),
                ));
            }
            next = t.end;
        }
        if next != data_len {
            return Err(HarnessError::case(
                "case file",
                format!("{next} data bytes after the header (what its tensors span)"),
                format!("{data_len} bytes"),
            ));
        }
        Ok(Header { tensors, metadata })
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        let t = self.tensors.iter().find(|t| t.name == name)?;
        Some(&t.shape)
    }

    /// [`Case::check_budget`] from the declared shapes, before any data is read.
    fn check_budget(&self) -> Result<()> {
        if let (Some(q), Some(k), Some(v)) = (
            self.shape("q"),
            self.shape("k_cache"),
            self.shape("v_cache"),
        ) {
            // A KV-cache case: the work of the dense call over each row's capacity.
            let (k, v) = crate::kvcase::dense_equivalent(k, v, self.shape("block_table"));
            return check_budget(q, &k, &v, None);
        }
        match (self.shape("q"), self.shape("k"), self.shape("v")) {
            (Some(q), Some(k), Some(v)) => check_budget(q, k, v, self.shape("attn_mask")),
            // A case without q, k or v is refused when it is built.
            _ => Ok(()),
        }
    }

    /// The tensors and metadata from the `data` the header describes (already checked).
    fn into_parts(self, data: &[u8]) -> Result<Parts> {
        let mut tensors = BTreeMap::new();
        for t in self.tensors {
            let bytes = &data[t.start..t.end];
            let tensor = Tensor::from_le_bytes(t.dtype, &t.shape, bytes)
                .ok_or_else(|| {
                    HarnessError::case(
                        format!("tensor {}", t.name),
                        format!("data matching shape {:?}", t.shape),
                        format!("{} bytes", bytes.len()),
                    )
                })?
                .map_err(|got| {
                    HarnessError::case(
                        format!("tensor {}", t.name),
                        "dtype F64, F32, F16, BF16, BOOL or I32",
                        got,
                    )
                })?;
            tensors.insert(t.name, tensor);
        }
        Ok((tensors, self.metadata))
    }
}

/// A case file's tensors by name and its metadata.
pub(crate) type Parts = (BTreeMap<String, Tensor>, HashMap<String, String>);

impl Case {
    /// The case of a file's parts: q, k, v, an optional attn_mask, options; every other
    /// tensor a result.
    pub(crate) fn from_parts((mut tensors, meta): Parts) -> Result<Case> {
        if !tensors.contains_key("k") && tensors.contains_key("k_cache") {
            return Err(HarnessError::case(
                "case file",
                "tensors q, k, v (this one has k_cache: a KV-cache case, read with kvcase::KvCase)",
                "a KV-cache case",
            ));
        }
        let options = parse_options(&meta)?;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| {
                HarnessError::case("case file", format!("a tensor named {name}"), "none")
            })
        };
        let q = take("q")?;
        let k = take("k")?;
        let v = take("v")?;
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            if t.shape().len() != 4 {
                return Err(HarnessError::case(
                    format!("tensor {name}"),
                    "4 dims [B, H, L, E]",
                    format!("{} dims {:?}", t.shape().len(), t.shape()),
                ));
            }
            if t.dtype().is_none() {
                return Err(HarnessError::case(
                    format!("tensor {name}"),
                    "a floating-point dtype",
                    t.dtype_name(),
                ));
            }
        }
        let attn_mask = tensors.remove("attn_mask");
        let extra_metadata = meta
            .into_iter()
            .filter(|(k, _)| !OPTION_KEYS.contains(&k.as_str()))
            .collect();
        Ok(Case {
            q,
            k,
            v,
            attn_mask,
            options,
            results: tensors,
            extra_metadata,
        })
    }
}

/// `__metadata__`: an object of strings (or null, as safetensors reads it).
fn parse_metadata(value: Json) -> Result<HashMap<String, String>> {
    let entries = match value {
        Json::Scalar(serde_json::Value::Null) => return Ok(HashMap::new()),
        Json::Object(entries) => entries,
        _ => {
            return Err(HarnessError::case(
                "metadata",
                "an object of strings",
                "another JSON value",
            ))
        }
    };
    let mut metadata = HashMap::new();
    for (key, value) in entries {
        let Json::Scalar(serde_json::Value::String(value)) = value else {
            return Err(HarnessError::case(
                format!("metadata {key}"),
                "a string",
                "another JSON value",
            ));
        };
        if metadata.contains_key(&key) {
            return Err(duplicate("metadata", "key", &key));
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// Reads and checks a case file's parts (as [`Case::read`] describes).
pub(crate) fn read_parts(path: &Path) -> Result<Parts> {
    use std::io::Read as _;
    let io = |source| HarnessError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = open_without_blocking(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(HarnessError::case(
            "case file",
            "a regular file",
            file_kind(&meta.file_type()),
        ));
    }
    let size = meta.len();
    if size == 0 {
        return Err(HarnessError::case(
            "case file",
            "a safetensors file",
            "an empty file",
        ));
    }
    let mut prefix = [0u8; 8];
    if size < 8 {
        return Err(too_short(size));
    }
    file.read_exact(&mut prefix).map_err(io)?;
    let header_len = header_len(prefix, size)?;
    let mut json = vec![0u8; header_len];
    file.read_exact(&mut json).map_err(io)?;
    let data_len = usize::try_from(size - 8 - header_len as u64).map_err(|_| {
        HarnessError::case(
            "case file",
            "a size this machine can address",
            format!("{size} bytes"),
        )
    })?;
    let header = Header::parse(&json, data_len)?;
    header.check_budget()?;
    let mut data = Vec::with_capacity(data_len);
    // One byte more than expected, so that a file that grew since `metadata` shows.
    file.take(data_len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() != data_len {
        return Err(HarnessError::case(
            "case file",
            format!("{data_len} data bytes (its size when opened)"),
            format!("{} bytes (it changed while being read)", data.len()),
        ));
    }
    header.into_parts(&data)
}

/// Parses and checks a buffer's parts (as [`Case::from_bytes`] describes).
pub(crate) fn parts_from_bytes(bytes: &[u8]) -> Result<Parts> {
    if bytes.is_empty() {
        return Err(HarnessError::case(
            "case file",
            "a safetensors file",
            "an empty file",
        ));
    }
    let Some((prefix, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(too_short(bytes.len() as u64));
    };
    let header_len = header_len(*prefix, bytes.len() as u64)?;
    let (json, data) = rest.split_at(header_len);
    let header = Header::parse(json, data.len())?;
    header.check_budget()?;
    header.into_parts(data)
}

/// Prefixes a case error with the file's path.
pub(crate) fn in_file(path: &Path, e: HarnessError) -> HarnessError {
    match e {
        HarnessError::Case {
            what,
            expected,
            actual,
        } => HarnessError::Case {
            what: format!("{}: {what}", path.display()),
            expected,
            actual,
        },
        other => other,
    }
}

#[cfg(unix)]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // A FIFO's open blocks until a writer appears; O_NONBLOCK returns at once, and on a
    // regular file it changes nothing.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

fn file_kind(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes, or [`MEMORY_FALLBACK`].
fn memory_available() -> u128 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(MEMORY_FALLBACK)
}

/// The budget of the module docs, for `q`, `k`, `v` and mask shapes as declared.
fn check_budget(q: &[usize], k: &[usize], v: &[usize], mask: Option<&[usize]>) -> Result<()> {
    let (Ok(q4), Ok(k4), Ok(v4)) = (
        <[usize; 4]>::try_from(q),
        <[usize; 4]>::try_from(k),
        <[usize; 4]>::try_from(v),
    ) else {
        // Not 4-d: refused when the case is built, before anything runs.
        return Ok(());
    };
    let [q, k, v] = [q4, k4, v4].map(|s| s.map(|d| d as u128));
    // Mismatched dims are refused by the specification before anything runs; until
    // then count the largest, so that no dim escapes the budget.
    let b = q[0].max(k[0]).max(v[0]);
    let (hq, hkv) = (q[1], k[1].max(v[1]));
    let (l, s) = (q[2], k[2].max(v[2]));
    let (e, ev) = (q[3].max(k[3]), v[3]);
    let stored: u128 = [&q[..], &k[..], &v[..]]
        .into_iter()
        .map(|t| t.iter().fold(1, |x: u128, &d| x.saturating_mul(d)))
        .fold(0, u128::saturating_add)
        .saturating_add(mask.map_or(0, |m| {
            m.iter().fold(1, |x: u128, &d| x.saturating_mul(d as u128))
        }));
    let m = |x: u128, y: u128| x.saturating_mul(y);
    let a = |x: u128, y: u128| x.saturating_add(y);
    // Per (b, h): a task; per query row: lse, the output row; per score: the
    // softmax passes, the two GEMMs' E + Ev multiply-adds. Per (b, kv head): k and v
    // widened once.
    let per_row = a(a(1, ev), m(s, a(a(1, e), ev)));
    let ops = a(
        m(m(b, hq), a(1, m(l, per_row))),
        m(m(b, hkv), a(1, m(s, a(e, ev)))),
    );
    // f64 (the truth run) is the widest: out [B, Hq, L, Ev] and the widened inputs in
    // 8 bytes, lse [B, Hq, L] in f32, k and v per (b, kv head) widened with an array
    // header each, and per worker a [64, S] score block and an S-byte keep row.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u128;
    let blocks = m(m(b, hq), l.div_ceil(REFERENCE_QUERY_BLOCK));
    let block_bytes = a(m(m(l.min(REFERENCE_QUERY_BLOCK), s), 8), s);
    let memory = [
        m(m(m(m(b, hq), l), ev), 8),
        m(m(m(b, hq), l), 4),
        m(m(b, hkv), a(m(m(s, a(e, ev)), 8), 128)),
        m(workers.min(blocks), block_bytes),
        m(stored, 8),
    ]
    .into_iter()
    .fold(0, a);
    let dims = format!(
        "B {b}, Hq {hq}, Hkv {hkv}, L {l}, S {s}, E {e}, Ev {ev} with {stored} stored elements"
    );
    let count = |x: u128| {
        if x == u128::MAX {
            "more than 2^128".to_string()
        } else {
            x.to_string()
        }
    };
    // A file whose q, k and v hold their data (every dim at least 1) needs at most
    // n^2 / 2 + 2n operations and 4.25 n^2 + 148 n bytes for n stored elements, so
    // these never refuse it; they refuse dims that no data backs (zero-size tensors).
    let justified_ops = a(WORK_FREE, m(stored, stored));
    let justified_memory = a(MEMORY_FREE, m(m(stored, stored), 8));
    if ops > justified_ops {
        return Err(HarnessError::case(
            "case size",
            format!(
                "at most {justified_ops} operations (5e7 + n^2, n = elements q, k, v and \
                 attn_mask store: dims must be backed by data)"
            ),
            format!("{} operations for {dims}", count(ops)),
        ));
    }
    if ops > WORK_CAP {
        return Err(HarnessError::case(
            "case size",
            format!("at most {WORK_CAP} operations (the work cap)"),
            format!("{} operations for {dims}", count(ops)),
        ));
    }
    if memory > justified_memory {
        return Err(HarnessError::case(
            "case size",
            format!(
                "at most {justified_memory} bytes (16 MiB + 8 n^2, n = elements q, k, v \
                 and attn_mask store: dims must be backed by data)"
            ),
            format!("{} bytes for {dims}", count(memory)),
        ));
    }
    if memory > MEMORY_FREE {
        let available = memory_available();
        if memory > available {
            return Err(HarnessError::case(
                "case size",
                format!("at most {available} bytes (MemAvailable)"),
                format!("{} bytes for {dims}", count(memory)),
            ));
        }
    }
    Ok(())
}

/// Every tensor and the metadata of any safetensors file, whatever the tensors' ranks:
/// what the nested and module goldens hold (`q [total, H, E]`, weights, `x`), which
/// [`Case`] (4-d `q`, `k`, `v`) does not describe.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFile {
    /// Float and bool tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Integer tensors (I32, I64, U32: offsets such as `cu_seqlens`) widened to i64.
    pub integers: BTreeMap<String, ndarray::ArrayD<i64>>,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Reads any safetensors file into a [`TensorFile`].
///
/// # Errors
/// An empty, truncated or non-safetensors buffer; a tensor whose data does not match
/// its shape; a dtype other than F64, F32, F16, BF16, BOOL, I32, I64, U32.
pub fn read_tensor_file(bytes: &[u8]) -> Result<TensorFile> {
    let not_safetensors = |what: &str, e: safetensors::SafeTensorError| {
        HarnessError::case(
            "tensor file",
            "a safetensors file",
            format!("unreadable {what} ({e})"),
        )
    };
    if bytes.is_empty() {
        return Err(HarnessError::case(
            "tensor file",
            "a safetensors file",
            "an empty file",
        ));
    }
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| not_safetensors("header", e))?;
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_safetensors("data", e))?;
    let mut file = TensorFile {
        tensors: BTreeMap::new(),
        integers: BTreeMap::new(),
        metadata: header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    };
    for (name, view) in st.tensors() {
        let (shape, data) = (view.shape(), view.data());
        let mismatch = || {
            HarnessError::case(
                format!("tensor {name}"),
                format!("data matching shape {shape:?}"),
                format!("{} bytes", data.len()),
            )
        };
        let ints = |width: usize, parse: fn(&[u8]) -> i64| -> Result<ndarray::ArrayD<i64>> {
            let numel: usize = shape.iter().product();
            if data.len() != numel * width {
                return Err(mismatch());
            }
            let values = data.chunks_exact(width).map(parse).collect();
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values).map_err(|_| mismatch())
        };
        use safetensors::Dtype as D;
        let widened = match view.dtype() {
            D::I32 => Some(ints(4, |c| {
                i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64
            })?),
            D::U32 => Some(ints(4, |c| {
                u32::from_le_bytes(c.try_into().expect("4 bytes")) as i64
            })?),
            D::I64 => Some(ints(8, |c| {
                i64::from_le_bytes(c.try_into().expect("8 bytes"))
            })?),
            _ => None,
        };
        if let Some(a) = widened {
            file.integers.insert(name, a);
            continue;
        }
        let tensor = Tensor::from_le_bytes(view.dtype(), shape, data)
            .ok_or_else(mismatch)?
            .map_err(|got| {
                HarnessError::case(
                    format!("tensor {name}"),
                    "dtype F64, F32, F16, BF16, BOOL, I32, I64 or U32",
                    got,
                )
            })?;
        file.tensors.insert(name, tensor);
    }
    Ok(file)
}

/// Writes safetensors bytes with a deterministic header: `__metadata__` first with its
/// keys sorted, then the tensors in the order their data is laid out (widest dtype
/// first, then by name, as the `safetensors` crate lays them out). The crate's own
/// serialiser writes metadata in `HashMap` order, which changes from run to run, and
/// golden files must be reproducible byte for byte.
pub fn serialize(tensors: &[(String, &Tensor)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut order: Vec<&(String, &Tensor)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        let width = |t: &Tensor| t.safetensors_dtype().size();
        width(b.1).cmp(&width(a.1)).then(a.0.cmp(&b.0))
    });
    let mut header = String::from("{");
    if !metadata.is_empty() {
        let entries: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect();
        let _ = write!(header, "\"__metadata__\":{{{}}}", entries.join(","));
    }
    let mut data = Vec::new();
    for (i, (name, tensor)) in order.iter().enumerate() {
        let bytes = tensor.to_le_bytes();
        let start = data.len();
        data.extend_from_slice(&bytes);
        if i > 0 || !metadata.is_empty() {
            header.push(',');
        }
        let dims: Vec<String> = tensor.shape().iter().map(|d| d.to_string()).collect();
        let _ = write!(
            header,
            "{}:{{\"dtype\":\"{:?}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(name),
            tensor.safetensors_dtype(),
            dims.join(","),
            start,
            data.len()
        );
    }
    header.push('}');
    // The format pads the header with spaces to a multiple of 8 bytes.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(options: &SdpaOptions) -> SdpaOptions {
        parse_options(&options_metadata(options).into_iter().collect()).unwrap()
    }

    #[test]
    fn window_and_softcap_metadata_round_trip_and_stay_out_when_unset() {
        let plain = SdpaOptions::default();
        let meta = options_metadata(&plain);
        assert!(!meta.contains_key("window_left") && !meta.contains_key("softcap"));
        assert_eq!(parsed(&plain), plain);
        let set = SdpaOptions {
            window: Window { left: 4, right: -1 },
            softcap: Some(30.0),
            ..Default::default()
        };
        assert_eq!(parsed(&set), set);
        let bad = |key: &str, value: &str| {
            let meta: HashMap<String, String> = [(key.to_string(), value.to_string())].into();
            parse_options(&meta).unwrap_err().to_string()
        };
        assert!(bad("window_left", "x").contains("window_left"));
        assert!(bad("softcap", "big").contains("softcap"));
    }
}
